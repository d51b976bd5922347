"""Class-conditional generators over token ids: MaskGIT (bidirectional, iterative parallel
decoding) and AR (causal, KV cache). Both use classifier-free guidance with a null class.

The class conditions the transformer through a prepended class token and, by
`config.generator_cond`, also through its embedding added to every input position ("add") or
through adaLN-zero modulation of every block ("adaln", as in DiT)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import KVCache, Mlp, MultiheadAttention, Transformer, init_weights

__all__ = ["MaskGIT", "ARGenerator", "build_generator", "sample_logits", "guidance_at",
           "CONDITIONINGS", "GUIDANCE_SCHEDULES"]

CONDITIONINGS = ("token", "add", "adaln")
GUIDANCE_SCHEDULES = ("constant", "linear")


def _check_choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_choice_temperature(value):
    if value is not None and value < 0:
        raise ValueError(f"maskgit_choice_temperature must be None or >= 0, got {value}")


def guidance_at(guidance, schedule, done):
    """The guidance weight for a decoding round that ends with fraction `done` (in (0, 1]) of
    the tokens fixed: `guidance` throughout ("constant"), or rising in proportion to `done`
    ("linear"), so early rounds lean less on the class and the last uses the full weight."""
    return guidance if schedule == "constant" else guidance * done


class _AdaLNBlock(nn.Module):
    """Pre-norm block (self-attention, MLP) modulated by a condition vector: per-channel shift
    and scale after each norm and a gate on each residual branch, all regressed from the
    condition. The regression starts at zero (adaLN-zero), so each block starts as the identity."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, cond, causal=False, cache=None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cond)[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + scale_a) + shift_a
        x = x + gate_a * self.attn(h, causal=causal, cache=cache)
        h = self.norm2(x) * (1 + scale_m) + shift_m
        return x + gate_m * self.mlp(h)


class _AdaLNTransformer(nn.Module):
    """`depth` adaLN-zero blocks and a final norm whose shift and scale also come from the
    condition. ``forward(x, cond, causal, cache)``: as `Transformer.forward`, `cond` [B, W]."""

    def __init__(self, dim, depth, heads, mlp_ratio):
        super().__init__()
        self.blocks = nn.ModuleList(_AdaLNBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.final = nn.Linear(dim, 2 * dim)

    def zero_modulation(self):
        for layer in [b.modulation for b in self.blocks] + [self.final]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, cond, causal=False, cache=None):
        cond = F.silu(cond)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, causal, None if cache is None else cache[i])
        shift, scale = self.final(cond)[:, None].chunk(2, -1)
        return self.norm(x) * (1 + scale) + shift


class _TokenTransformer(nn.Module):
    """[class token, tokens] -> logits over the vocabulary."""

    def __init__(self, vocab_in, vocab_out, seq_len, num_classes, vit, class_dropout,
                 cond="token", guidance_schedule="constant"):
        super().__init__()
        _check_choice(cond, CONDITIONINGS, "generator_cond")
        _check_choice(guidance_schedule, GUIDANCE_SCHEDULES, "guidance_schedule")
        if not 0 <= class_dropout < 1:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.seq_len, self.num_classes, self.vocab = seq_len, num_classes, vocab_out
        self.class_dropout, self.cond, self.guidance_schedule = class_dropout, cond, guidance_schedule
        self.tok = nn.Embedding(vocab_in, vit.width)
        self.cls = nn.Embedding(num_classes + 1, vit.width)  # index num_classes = null class
        self.pos = nn.Parameter(torch.zeros(seq_len + 1, vit.width))
        # "add": a second class embedding, added to every token's input
        self.cls_all = nn.Embedding(num_classes + 1, vit.width) if cond == "add" else None
        if cond == "adaln":
            self.vit = _AdaLNTransformer(vit.width, vit.depth, vit.heads, vit.mlp_ratio)
        else:
            self.vit = Transformer(vit.width, vit.depth, vit.heads, vit.mlp_ratio)
        self.head = nn.Linear(vit.width, vocab_out)
        init_weights(self)
        nn.init.trunc_normal_(self.pos, std=0.02)
        if cond == "adaln":
            self.vit.zero_modulation()

    def embed(self, ids, labels):
        first = self.cls(labels)[:, None] + self.pos[:1]
        return torch.cat([first, self.embed_next(ids, labels, 1)], 1)

    def embed_next(self, ids, labels, position):
        """Inputs of `ids` [B, n] at sequence positions position.. (the class token is 0)."""
        x = self.tok(ids) + self.pos[position : position + ids.shape[1]]
        return x if self.cls_all is None else x + self.cls_all(labels)[:, None]

    def body(self, x, labels, causal=False, cache=None):
        """Embedded inputs [B, L, W] -> logits [B, L, V]."""
        if self.cond == "adaln":
            return self.head(self.vit(x, self.cls(labels), causal=causal, cache=cache))
        return self.head(self.vit(x, causal=causal, cache=cache))

    def drop_labels(self, labels):
        if not self.training or self.class_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.class_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def null(self, labels):
        return torch.full_like(labels, self.num_classes)

    def guided(self, ids, labels, guidance):
        """Logits of `forward`, guided by the null class in one doubled batch."""
        if guidance == 0:
            return self(ids, labels)
        cond, uncond = self(torch.cat([ids, ids]), torch.cat([labels, self.null(labels)])).chunk(2)
        return _cfg(cond, uncond, guidance)

    def _schedule(self, schedule):
        schedule = self.guidance_schedule if schedule is None else schedule
        _check_choice(schedule, GUIDANCE_SCHEDULES, "guidance_schedule")
        return schedule


def _cfg(cond, uncond, guidance):
    """Classifier-free guidance on logits."""
    return cond + guidance * (cond - uncond)


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Samples ids from [..., V] logits; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keeps the first token always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


class MaskGIT(_TokenTransformer):
    """Bidirectional transformer; training masks a cosine-scheduled fraction of the tokens, at
    least `min_mask` of them."""

    def __init__(self, vocab, seq_len, num_classes, vit, class_dropout=0.1, cond="token",
                 guidance_schedule="constant", min_mask=0.0, choice_temperature=None):
        super().__init__(vocab + 1, vocab, seq_len, num_classes, vit, class_dropout, cond,
                         guidance_schedule)
        if not 0 <= min_mask <= 1:
            raise ValueError(f"maskgit_min_mask must be in [0, 1], got {min_mask}")
        _check_choice_temperature(choice_temperature)
        self.mask_id = vocab
        self.min_mask, self.choice_temperature = min_mask, choice_temperature

    def forward(self, ids, labels):
        """ids [B,T] (mask_id where masked), labels [B] (num_classes = null) -> logits [B,T,V]."""
        return self.body(self.embed(ids, labels), labels)[:, 1:]

    def loss(self, ids, labels):
        B, T = ids.shape
        # ratio cos(pi/2 r), r uniform on [0, r_max): the cosine schedule cut at min_mask
        r_max = 2 / math.pi * math.acos(self.min_mask)
        r = torch.rand(B, 1, device=ids.device) * r_max
        n_mask = torch.ceil(torch.cos(r * math.pi / 2) * T).clamp_min(1)
        rank = torch.rand(B, T, device=ids.device).argsort(-1).argsort(-1)
        masked = rank < n_mask
        inp = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
        logits = self(inp, self.drop_labels(labels))
        return F.cross_entropy(logits[masked].float(), ids[masked])

    @torch.no_grad()
    def generate(self, labels, steps=8, guidance=0.0, temperature=1.0, generator=None, *,
                 guidance_schedule=None, choice_temperature=None):
        """`choice_temperature` scales the Gumbel noise on the confidences that pick which
        samples stay (annealed to 0 over the rounds); None: the model's
        `choice_temperature`, and if that is None, `temperature`."""
        schedule = self._schedule(guidance_schedule)
        _check_choice_temperature(choice_temperature)
        if choice_temperature is None:
            choice_temperature = temperature if self.choice_temperature is None else self.choice_temperature
        B, T = labels.shape[0], self.seq_len
        device = labels.device
        ids = torch.full((B, T), self.mask_id, dtype=torch.long, device=device)
        for step in range(steps):
            masked = ids == self.mask_id
            n_left = int(math.floor(T * math.cos(math.pi / 2 * (step + 1) / steps)))
            n_left = min(n_left, int(masked.sum(-1).min()) - 1) if step + 1 < steps else 0
            n_left = max(n_left, 0)
            logits = self.guided(ids, labels, guidance_at(guidance, schedule, 1 - n_left / T))
            sampled = sample_logits(logits, temperature, generator=generator)
            sampled = torch.where(masked, sampled, ids)
            logp = logits.float().log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
            # annealed Gumbel noise: early steps explore, the last step is greedy in confidence
            anneal = choice_temperature * (1 - (step + 1) / steps)
            u = torch.rand(B, T, device=device, generator=generator).clamp(1e-20, 1 - 1e-7)
            conf = logp + anneal * -torch.log(-torch.log(u))
            conf = torch.where(masked, conf, float("inf"))
            remask = torch.zeros_like(masked)
            if n_left > 0:
                lowest = conf.topk(n_left, dim=-1, largest=False).indices
                remask.scatter_(1, lowest, True)
            ids = torch.where(remask, torch.full_like(ids, self.mask_id), sampled)
        return ids


class ARGenerator(_TokenTransformer):
    """Causal transformer: position t predicts token t from the class and tokens < t."""

    def __init__(self, vocab, seq_len, num_classes, vit, class_dropout=0.1, cond="token",
                 guidance_schedule="constant"):
        super().__init__(vocab, vocab, seq_len, num_classes, vit, class_dropout, cond,
                         guidance_schedule)

    def forward(self, ids, labels):
        """ids [B,T'] -> logits [B,T'+1,V]: logits[:, t] predict token t."""
        return self.body(self.embed(ids, labels), labels, causal=True)

    def loss(self, ids, labels):
        logits = self(ids[:, :-1], self.drop_labels(labels))
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())

    @torch.no_grad()
    def generate(self, labels, guidance=0.0, temperature=1.0, top_k=None, top_p=None,
                 generator=None, *, guidance_schedule=None):
        schedule = self._schedule(guidance_schedule)
        T = self.seq_len
        lab = labels if guidance == 0 else torch.cat([labels, self.null(labels)])
        cache = KVCache(T + 1)
        x = self.embed(lab.new_zeros(len(lab), 0), lab)
        out = []
        for t in range(T):
            logits = self.body(x, lab, causal=True, cache=cache)[:, -1]
            if guidance != 0:
                logits = _cfg(*logits.chunk(2), guidance_at(guidance, schedule, (t + 1) / T))
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)
            out.append(nxt)
            tok = nxt if guidance == 0 else torch.cat([nxt, nxt])
            x = self.embed_next(tok[:, None], lab, t + 1)
        return torch.stack(out, 1)


def build_generator(kind, config):
    """The `kind` generator ("maskgit" or "ar") of `config`."""
    common = dict(cond=config.generator_cond, guidance_schedule=config.guidance_schedule)
    if kind == "maskgit":
        return MaskGIT(config.vocab_size, config.num_quantized, config.num_classes, config.generator,
                       config.class_dropout, min_mask=config.maskgit_min_mask,
                       choice_temperature=config.maskgit_choice_temperature, **common)
    if kind == "ar":
        return ARGenerator(config.vocab_size, config.num_quantized, config.num_classes,
                           config.generator, config.class_dropout, **common)
    raise ValueError(f"generator kind must be 'maskgit' or 'ar', got {kind!r}")
