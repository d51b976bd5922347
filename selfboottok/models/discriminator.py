"""A PatchGAN discriminator (Isola et al. 2017, as VQGAN uses it): real/fake logits for
overlapping patches of an image, trained from scratch alongside the tokenizer."""

from __future__ import annotations

from torch import nn

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module):
    """Images [B,C,H,W] in [-1,1] -> logits [B,1,H/4,W/4]: two stride-2 4x4 convolutions, one
    3x3 convolution, each with group norm (not the first) and leaky ReLU, then a 3x3 conv to one
    logit per location."""

    def __init__(self, channels: int = 3, width: int = 32):
        super().__init__()
        w = int(width)
        self.net = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GroupNorm(8 if w % 4 == 0 else 1, 2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.GroupNorm(8 if w % 2 == 0 else 1, 4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 3, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        return self.net(images)
