"""Class-conditional generators over token ids: MaskGIT (bidirectional, iterative parallel
decoding) and AR (causal, KV cache). Both use classifier-free guidance with a null class."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import KVCache, Transformer, init_weights

__all__ = ["MaskGIT", "ARGenerator", "build_generator", "sample_logits"]


class _TokenTransformer(nn.Module):
    """[class token, tokens] -> logits over the vocabulary."""

    def __init__(self, vocab_in, vocab_out, seq_len, num_classes, vit, class_dropout):
        super().__init__()
        self.seq_len, self.num_classes, self.vocab = seq_len, num_classes, vocab_out
        self.class_dropout = class_dropout
        self.tok = nn.Embedding(vocab_in, vit.width)
        self.cls = nn.Embedding(num_classes + 1, vit.width)  # index num_classes = null class
        self.pos = nn.Parameter(torch.zeros(seq_len + 1, vit.width))
        self.vit = Transformer(vit.width, vit.depth, vit.heads, vit.mlp_ratio)
        self.head = nn.Linear(vit.width, vocab_out)
        init_weights(self)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def embed(self, ids, labels):
        x = torch.cat([self.cls(labels)[:, None], self.tok(ids)], 1)
        return x + self.pos[: x.shape[1]]

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
    """Bidirectional transformer; training masks a cosine-scheduled fraction of the tokens."""

    def __init__(self, vocab, seq_len, num_classes, vit, class_dropout=0.1):
        super().__init__(vocab + 1, vocab, seq_len, num_classes, vit, class_dropout)
        self.mask_id = vocab

    def forward(self, ids, labels):
        """ids [B,T] (mask_id where masked), labels [B] (num_classes = null) -> logits [B,T,V]."""
        return self.head(self.vit(self.embed(ids, labels)))[:, 1:]

    def loss(self, ids, labels):
        B, T = ids.shape
        r = torch.rand(B, 1, device=ids.device)
        n_mask = torch.ceil(torch.cos(r * math.pi / 2) * T).clamp_min(1)
        rank = torch.rand(B, T, device=ids.device).argsort(-1).argsort(-1)
        masked = rank < n_mask
        inp = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
        logits = self(inp, self.drop_labels(labels))
        return F.cross_entropy(logits[masked].float(), ids[masked])

    @torch.no_grad()
    def generate(self, labels, steps=8, guidance=0.0, temperature=1.0, generator=None):
        B, T = labels.shape[0], self.seq_len
        device = labels.device
        ids = torch.full((B, T), self.mask_id, dtype=torch.long, device=device)
        for step in range(steps):
            masked = ids == self.mask_id
            logits = self.guided(ids, labels, guidance)
            sampled = sample_logits(logits, temperature, generator=generator)
            sampled = torch.where(masked, sampled, ids)
            logp = logits.float().log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
            # annealed Gumbel noise: early steps explore, the last step is greedy in confidence
            anneal = temperature * (1 - (step + 1) / steps)
            u = torch.rand(B, T, device=device, generator=generator).clamp(1e-20, 1 - 1e-7)
            conf = logp + anneal * -torch.log(-torch.log(u))
            conf = torch.where(masked, conf, float("inf"))
            n_left = int(math.floor(T * math.cos(math.pi / 2 * (step + 1) / steps)))
            n_left = min(n_left, int(masked.sum(-1).min()) - 1) if step + 1 < steps else 0
            n_left = max(n_left, 0)
            remask = torch.zeros_like(masked)
            if n_left > 0:
                lowest = conf.topk(n_left, dim=-1, largest=False).indices
                remask.scatter_(1, lowest, True)
            ids = torch.where(remask, torch.full_like(ids, self.mask_id), sampled)
        return ids


class ARGenerator(_TokenTransformer):
    """Causal transformer: position t predicts token t from the class and tokens < t."""

    def __init__(self, vocab, seq_len, num_classes, vit, class_dropout=0.1):
        super().__init__(vocab, vocab, seq_len, num_classes, vit, class_dropout)

    def forward(self, ids, labels):
        """ids [B,T'] -> logits [B,T'+1,V]: logits[:, t] predict token t."""
        return self.head(self.vit(self.embed(ids, labels), causal=True))

    def loss(self, ids, labels):
        logits = self(ids[:, :-1], self.drop_labels(labels))
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())

    @torch.no_grad()
    def generate(self, labels, guidance=0.0, temperature=1.0, top_k=None, top_p=None,
                 generator=None):
        B, T = labels.shape[0], self.seq_len
        lab = labels if guidance == 0 else torch.cat([labels, self.null(labels)])
        cache = KVCache(T + 1)
        x = self.cls(lab)[:, None] + self.pos[:1]
        out = []
        for t in range(T):
            logits = self.head(self.vit(x, causal=True, cache=cache))[:, -1]
            if guidance != 0:
                logits = _cfg(*logits.chunk(2), guidance)
            nxt = sample_logits(logits, temperature, top_k, top_p, generator)
            out.append(nxt)
            tok = nxt if guidance == 0 else torch.cat([nxt, nxt])
            x = self.tok(tok)[:, None] + self.pos[t + 1 : t + 2]
        return torch.stack(out, 1)


def build_generator(kind, config):
    cls = {"maskgit": MaskGIT, "ar": ARGenerator}[kind]
    return cls(config.vocab_size, config.num_quantized, config.num_classes, config.generator,
               config.class_dropout)
