"""MaskGIT dynamics model of the Genie pipeline: predicts the next frame's tokens from the context and a latent action.

Legend: B batch, T frames, N = rows * cols tokens per frame (16 x 16), D model dim, V codebook size.

The model sees the full token grid of every context frame (never a pooled summary, the seed's mistake) through the
spatio-temporal transformer of transformer.py. Frame t is conditioned (adaLN, per frame) on the latent action a_{t-1}
that led to it; frame 0 gets a learned "no action" embedding.

Training (MaskGIT): each frame after the first has its own masking ratio, cos(pi/2 * u) with u ~ U(0, 1); its masked
tokens are replaced by a [MASK] token and predicted with cross-entropy. The first frame is never masked: it is the
context every clip starts from. Causal attention in time lets one clip train every transition at once.

Sampling: the next frame starts fully masked and is decoded in `steps` parallel steps: sample all masked tokens
(temperature), keep the most confident, re-mask the rest so that cos(pi/2 * s / steps) of the frame stays masked after
step s. The context's temporal keys/values are cached (transformer.KVCache), so each step runs only the new frame's
N tokens; the finished frame is pushed through once more to join the cache, which slides over `context` frames.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from transformer import STTransformer


@dataclass
class DynamicsConfig:
    vocab_size: int = 1024   # the tokenizer's codebook
    rows: int = 16           # token grid of a frame
    cols: int = 16
    num_actions: int = 8     # the LAM's latent actions
    context: int = 16        # frames per training clip, and frames seen when predicting the next one
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0


PRESETS = {
    "tiny": DynamicsConfig(context=4, dim=64, depth=2, heads=2),
    "default": DynamicsConfig(),
}


class Dynamics(nn.Module, PyTorchModelHubMixin):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        self.mask_token = config.vocab_size
        self.no_action = config.num_actions
        self.token_embed = nn.Embedding(config.vocab_size + 1, config.dim)
        self.action_embed = nn.Embedding(config.num_actions + 1, config.dim)
        self.transformer = STTransformer(config.dim, config.depth, config.heads, config.rows, config.cols,
                                         config.mlp_ratio)
        self.head = nn.Linear(config.dim, config.vocab_size)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.action_embed.weight, std=0.02)

    def frame_conditions(self, actions):
        """Latent actions of the transitions (B, T - 1) -> per-frame conditions (B, T, D), "no action" first."""
        first = actions.new_full((actions.shape[0], 1), self.no_action)
        return self.action_embed(torch.cat([first, actions], dim=1))

    def hidden(self, tokens, cond, cache=None):
        """tokens (B, T, N) with [MASK] where unknown -> features (B, T, N, D). With a cache, T = 1."""
        return self.transformer(self.token_embed(tokens), cond, cache)

    def forward(self, tokens, actions):
        """tokens (B, T, rows, cols) from the tokenizer, actions (B, T - 1) from the LAM -> (loss, logs)."""
        b, t = tokens.shape[:2]
        target = tokens.flatten(2)  # (B, T, N)
        ratio = torch.cos(math.pi / 2 * torch.rand(b, t, 1, device=tokens.device))
        ratio[:, 0] = 0  # the first frame is the given context
        mask = torch.rand(target.shape, device=tokens.device) < ratio  # (B, T, N)
        logits = self.head(self.hidden(target.masked_fill(mask, self.mask_token), self.frame_conditions(actions)))
        # Means over the masked tokens as weighted sums: indexing with the mask would give a shape only the GPU knows.
        weight = mask.float() / mask.sum().clamp_min(1)  # (B, T, N)
        loss = (F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none") * weight.flatten()).sum()
        accuracy = ((logits.argmax(-1) == target).float() * weight).sum()
        return loss, {"ce": loss.detach(), "acc": accuracy.detach()}

    # ------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def start(self, tokens, actions=None):
        """Prefill a cache with context frames: tokens (B, T, rows, cols), actions (B, T - 1) between them."""
        if actions is None:
            actions = tokens.new_zeros(tokens.shape[0], tokens.shape[1] - 1)
        cache = self.transformer.new_cache(tokens.shape[0], self.config.context - 1, tokens.device)
        tokens, cond = tokens.flatten(2), self.frame_conditions(actions)
        for i in range(tokens.shape[1]):
            self.hidden(tokens[:, i:i + 1], cond[:, i:i + 1], cache)
            cache.commit()
        return cache

    @torch.no_grad()
    def step(self, cache, action, steps=8, temperature=1.0, generator=None):
        """Decode the next frame after the cached context, given the action (B,) leading to it; it joins the cache.
        Returns its tokens (B, rows, cols)."""
        cond = self.action_embed(action)[:, None]  # (B, 1, D)
        tokens = self.decode(lambda t: self.head(self.hidden(t, cond, cache))[:, 0], len(action), steps, temperature,
                             generator)
        self.hidden(tokens[:, None], cond, cache)
        cache.commit()
        return tokens.view(-1, self.config.rows, self.config.cols)

    @torch.no_grad()
    def step_uncached(self, context, context_actions, action, steps=8, temperature=1.0, generator=None):
        """The same prediction recomputing the whole context at every decoding step (reference for tests, bench)."""
        context = context.flatten(2)[:, -(self.config.context - 1):]
        cond = self.frame_conditions(torch.cat([context_actions, action[:, None]], dim=1))[:, -context.shape[1] - 1:]

        def logits(new):  # new (B, 1, N)
            return self.head(self.hidden(torch.cat([context, new], dim=1), cond))[:, -1]

        tokens = self.decode(logits, len(action), steps, temperature, generator)
        return tokens.view(-1, self.config.rows, self.config.cols)

    def decode(self, logits_fn, batch, steps, temperature, generator):
        """MaskGIT's parallel decoding of one frame, batched: logits_fn (B, 1, N) tokens -> (B, N, V) logits."""
        n = self.config.rows * self.config.cols
        device = self.head.weight.device
        tokens = torch.full((batch, n), self.mask_token, dtype=torch.long, device=device)
        for s in range(steps):
            logits = logits_fn(tokens[:, None]).float()  # (B, N, V)
            masked = tokens == self.mask_token
            if temperature > 0:
                u = torch.rand(logits.shape, device=device, generator=generator).clamp_(1e-20, 1)
                sampled = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max sampling
            else:
                sampled = logits.argmax(-1)
            confidence = F.log_softmax(logits, dim=-1).gather(-1, sampled[..., None])[..., 0]
            if temperature > 0:  # MaskGIT's annealed noise on the confidence: more exploration in early steps
                u = torch.rand(confidence.shape, device=device, generator=generator).clamp_(1e-20, 1)
                confidence = confidence - temperature * (1 - (s + 1) / steps) * torch.log(-torch.log(u))
            tokens = torch.where(masked, sampled, tokens)
            confidence = confidence.masked_fill(~masked, float("inf"))  # tokens fixed earlier stay fixed
            still_masked = math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps))
            if still_masked > 0:
                remask = confidence.topk(still_masked, dim=-1, largest=False).indices
                tokens = tokens.scatter(-1, remask, self.mask_token)
        return tokens
