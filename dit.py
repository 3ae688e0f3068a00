"""Causal DiT over sequences of VAE latent frames, trained with flow matching (the diffusion world model).

Legend: B batch, T frames, N = rows * cols latent tokens per frame (11 x 20 = 220), C latent channels (48),
D model dim, P context frames.

Flow matching, as in the seed: x_t = (1 - t) * x_0 + t * x_1 with x_0 ~ N(0, I) noise and x_1 the (unit-variance)
latents; t = 0 is pure noise, t = 1 data, and the model predicts the velocity v = x_1 - x_0. Every frame of a clip
draws its own t (diffusion forcing), and attention in time is causal, so at generation the context can sit at a high
t (context_t, slightly noisy) while the new frame is integrated from t = 0 to 1.

Network: the spatio-temporal transformer of transformer.py (spatial attention over the 220 tokens of a frame with
2-D RoPE, causal temporal attention per token position with 1-D RoPE computed for any frame index, QK-norm), with
the flow time as its per-frame adaLN-Zero condition: a frame's t is embedded once per frame, not once per token (the
seed's per-token FiLM MLP held over half its parameters and FLOPs). The output projection starts at zero.

Training options (both off unless asked; see `forward`):
  self-forcing (the seed's, --self_forcing_p): with probability p a sample's noise endpoint x_0 is replaced by the
      one the model itself back-projects from a random intermediate point, without gradient:
          x_m   = (1 - m) * x_0 + m * x_1,   m ~ U(0, 1) per frame
          x_0'  = x_m - m * v_theta(x_m, m)          (Euler step from t = m back to t = 0)
      and the loss is ordinary flow matching from x_0' to x_1: target x_1 - x_0' at x_t = (1 - t) x_0' + t x_1.
  context forcing (--context_forcing R): the R frames after a random real prefix are replaced by the model's own
      autoregressive rollout from that prefix (no gradient through it), and the loss is taken on the real frames
      after them only: the model learns to continue from contexts that carry its own errors (exposure bias).

Generation (`rollout`): context frames are noised once to context_t and their temporal keys/values cached; each
Euler step of a new frame runs the network on that frame's N tokens only. The finished frame is re-noised to
context_t and run once more to join the cache, which keeps the last seq_len - 1 frames. Inside the training length
this equals recomputing the whole window at every step (`cached=False`); past it, a frame keeps the keys it got when
it joined rather than being re-encoded without the frames that slid out (a rolling cache, as in streaming LLMs).
"""
import math
import random
from dataclasses import dataclass

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from transformer import STTransformer
from utils import UserError


@dataclass
class DiTConfig:
    rows: int = 11            # the VAE's latent grid: 180x320 frames in 16 px patches
    cols: int = 20
    latent_dim: int = 48
    seq_len: int = 24         # frames per training clip: the context at generation is seq_len - 1 frames
    dim: int = 960            # 960 / 15 heads = 64 per head, the size fused attention kernels like
    depth: int = 11
    heads: int = 15
    mlp_ratio: float = 4.0
    latent_scale: float = 1.0  # multiplies the VAE's latents to unit variance; set from the latent store


PRESETS = {
    "tiny": DiTConfig(dim=64, depth=2, heads=4),
    "small": DiTConfig(dim=384, depth=6, heads=6),
    "default": DiTConfig(),
}


def check_vae(config, vae_config):
    """The DiT's latent grid must be the VAE's: a one-line error (utils.UserError) otherwise."""
    expected = (vae_config.tokens, vae_config.latent_dim)
    if (config.rows * config.cols, config.latent_dim) != expected:
        raise UserError(f"the VAE makes latents of shape {expected}, the DiT takes "
                        f"({config.rows * config.cols}, {config.latent_dim}): train them on the same VAE")


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of flow times t (...) in [0, 1] -> (..., dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    angles = 1000 * t.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class DiT(nn.Module, PyTorchModelHubMixin):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.latent_dim, config.dim)
        self.time_embed = nn.Sequential(nn.Linear(256, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim))
        self.transformer = STTransformer(config.dim, config.depth, config.heads, config.rows, config.cols,
                                         config.mlp_ratio)
        self.out = nn.Linear(config.dim, config.latent_dim)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        nn.init.zeros_(self.out.weight)  # the model starts by predicting zero velocity
        nn.init.zeros_(self.out.bias)

    def velocity(self, x, t, cache=None):
        """x (B, T, N, C) at flow times t (B, T) -> predicted velocity (B, T, N, C).
        With a cache (transformer.KVCache), T = 1: the frame after the cached ones."""
        cond = self.time_embed(timestep_embedding(t, 256))  # (B, T, D): once per frame
        return self.out(self.transformer(self.embed(x), cond, cache))

    def forward(self, x1, self_forcing_p=0.0, context_forcing=0, rollout_steps=4, context_t=0.95):
        """Flow-matching loss of clean scaled latents x1 (B, T, N, C) -> (loss, logs). See the module docstring."""
        b, t_len = x1.shape[:2]
        frame_weight = x1.new_ones(b, t_len)
        # The random choices that decide what runs are drawn on the host (Python's RNG, saved in training states):
        # drawn on the GPU, the host would have to wait for them before it could queue the work.
        if context_forcing:
            prefix = random.randrange(1, t_len - context_forcing)
            with torch.no_grad():
                generated = self.rollout(x1[:, :prefix], context_forcing, rollout_steps, context_t)
            x1 = torch.cat([x1[:, :prefix], generated.to(x1.dtype), x1[:, prefix + context_forcing:]], dim=1)
            frame_weight[:, prefix:prefix + context_forcing] = 0  # no target for the model's own frames
        x0 = torch.randn_like(x1)
        if self_forcing_p > 0:
            chosen = [random.random() < self_forcing_p for _ in range(b)]
            if any(chosen):
                with torch.no_grad():
                    m = torch.rand(b, t_len, device=x1.device)
                    mid = (1 - m[..., None, None]) * x0 + m[..., None, None] * x1
                    back = mid - m[..., None, None] * self.velocity(mid, m).to(x1.dtype)
                mask = torch.tensor(chosen).to(x1.device, non_blocking=True)  # (B,)
                x0 = torch.where(mask[:, None, None, None], back, x0)
        t = torch.rand(b, t_len, device=x1.device)
        xt = (1 - t[..., None, None]) * x0 + t[..., None, None] * x1
        error = (self.velocity(xt, t).float() - (x1 - x0).float()).pow(2).mean(dim=(2, 3))  # (B, T)
        loss = (error * frame_weight).sum() / frame_weight.sum()
        return loss, {"flow": loss.detach()}

    @torch.no_grad()
    def rollout(self, context, num_frames, steps=10, context_t=0.95, generator=None, cached=True):
        """Continue clean scaled latents context (B, P, N, C) by num_frames frames -> (B, num_frames, N, C)."""
        frames = self.stream(context, steps, context_t, generator, cached)
        return torch.cat([next(frames) for _ in range(num_frames)], dim=1)

    @torch.no_grad()
    def stream(self, context, steps=10, context_t=0.95, generator=None, cached=True):
        """Yield the frames that continue context (B, P, N, C), one (B, 1, N, C) at a time, without end.

        Each new frame is integrated from noise with `steps` Euler steps while the context is held at context_t.
        """
        b, device, window = context.shape[0], context.device, self.config.seq_len - 1

        def noise(frames):
            return torch.randn(frames.shape, device=device, generator=generator, dtype=frames.dtype)

        def at_context_t(frames):  # (B, P, N, C) -> the same frames noised to context_t
            return (1 - context_t) * noise(frames) + context_t * frames

        def times(value, frames):
            return torch.full((b, frames), value, device=device)

        def remember(frames):  # (B, F, N, C) at context_t join the cache, one frame at a time
            for i in range(frames.shape[1]):  # contiguous: a step's strides, so that a compiled step serves both
                self.velocity(frames[:, i:i + 1].contiguous(), times(context_t, 1), cache)
                cache.commit()

        past = at_context_t(context[:, -window:])  # (B, P, N, C): fixed while the new frame is integrated
        cache = None
        if cached:
            cache = self.transformer.new_cache(b, window, device)
            remember(past)
        while True:
            x = noise(context[:, :1])  # (B, 1, N, C) at t = 0
            for k in range(steps):
                if cached:
                    v = self.velocity(x, times(k / steps, 1), cache)
                else:  # the reference: the whole window through the network at every step
                    t = torch.cat([times(context_t, past.shape[1]), times(k / steps, 1)], dim=1)
                    v = self.velocity(torch.cat([past, x], dim=1), t)[:, -1:]
                x = x + v.to(x.dtype) / steps
            yield x
            joined = at_context_t(x)
            past = torch.cat([past, joined], dim=1)[:, -window:]
            if cached:
                remember(joined)
