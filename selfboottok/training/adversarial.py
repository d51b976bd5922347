"""The optional adversarial loss of the reconstructions (`loss.gan > 0`): a PatchGAN
discriminator trained from scratch with the hinge loss and optional LeCam regularisation,
joining after a delay, with the generator term weighted adaptively as in VQGAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfboottok.models.discriminator import PatchDiscriminator

from . import distributed as dist

__all__ = ["Adversary"]


class Adversary:
    """Owns the discriminator and its optimizer. Per training step: the loss function adds
    :meth:`generator_loss` for each reconstruction (which also keeps the images it saw), and
    after the tokenizer's optimizer step :meth:`discriminator_step` trains the discriminator
    on them. `start` is the step at which both begin."""

    def __init__(self, config, start: int, device):
        cfg = config.loss
        self.weight, self.adaptive, self.lecam = cfg.gan, cfg.gan_adaptive, cfg.lecam
        self.start = int(start)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.disc = PatchDiscriminator(config.channels, cfg.disc_width).to(device)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
        # EMAs of the mean logits on real and fake images, for LeCam
        self.ema_real = torch.zeros((), device=device)
        self.ema_fake = torch.zeros((), device=device)
        self.step = 0
        self._seen: list = []

    def active(self) -> bool:
        return self.step >= self.start

    def generator_loss(self, real, fake, rec_loss, last_layer):
        """The weighted hinge generator term for reconstructions `fake` of `real` (0 before the
        start). With `gan_adaptive`, the weight is scaled by the ratio of the gradient norms of
        `rec_loss` and of the term at `last_layer` (a parameter of the decoder's last layer),
        so the adversarial term neither drowns nor is drowned by the reconstruction."""
        if not self.active():
            return fake.new_zeros(())
        self._seen.append((real.detach(), fake.detach()))
        self.disc.requires_grad_(False)
        g_loss = -self.disc(fake.float()).mean()
        self.disc.requires_grad_(True)
        weight = self.weight
        if self.adaptive and torch.is_grad_enabled() and last_layer.requires_grad:
            g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
            g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            weight = weight * (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()
        return weight * g_loss

    def discriminator_step(self) -> dict:
        """Trains the discriminator on the images of this step's generator terms; counts the step."""
        self.step += 1
        if not self._seen:
            return {}
        real = torch.cat([r for r, _ in self._seen]).float()
        fake = torch.cat([f for _, f in self._seen]).float()
        self._seen.clear()
        logits_real, logits_fake = self.disc(real), self.disc(fake)
        loss = F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()
        with torch.no_grad():
            self.ema_real.lerp_(logits_real.mean(), 0.01)
            self.ema_fake.lerp_(logits_fake.mean(), 0.01)
        if self.lecam:
            loss = loss + self.lecam * (F.relu(logits_real - self.ema_fake).pow(2).mean()
                                        + F.relu(self.ema_real - logits_fake).pow(2).mean())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if dist.active():
            for p in self.disc.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= dist.world()
        self.opt.step()
        return {"disc_loss": loss.detach(), "logits_real": logits_real.mean().detach(),
                "logits_fake": logits_fake.mean().detach()}

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "ema_real": self.ema_real, "ema_fake": self.ema_fake}

    def load_state_dict(self, state: dict):
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])
        self.ema_real.copy_(state["ema_real"])
        self.ema_fake.copy_(state["ema_fake"])
