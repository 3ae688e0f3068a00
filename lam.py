"""Latent action model of the Genie pipeline: learns, from unlabelled clips, one discrete action per transition.

Legend: B batch, T frames, N tokens per frame, P numbers per token, D model dim, C code dim, K num_actions.

Two input kinds (`input`): "pixels", frames (B, T, 3, H, W) in [-1, 1] cut into N = (image_size / patch)^2 patches
of P = 3 * patch^2 pixels (the Genie pipeline's 64x64 frames); "latents", the ViT-VAE's latent frames (B, T, N, P) with
N = rows * cols = 220 tokens of P = latent_dim = 48 (the diffusion pipeline's footage at 320x180), taken as they
are. Everything after the tokens is the same model.

Encoder (inverse dynamics): frames -> a small code per transition, quantised to one of K actions: a_t for the
transition t -> t+1. Decoder (forward dynamics): the past frames and a_t -> frame t+1. The only path from x_{t+1} to
the decoder is a_t, so a useful action must say what changed. One clip trains all T - 1 transitions at once. After
training only the encoder matters: infer_actions labels clips for the dynamics model. Two architectures (`arch`):
  - conv (the default): convolutional nets on the frames as images (latent frames as 48-channel images of 11x20).
    The encoder reads frames t-1, t and t+1 stacked; the decoder is a U-Net that reads frames t-1 and t with the
    action's embedding tiled over every level, and predicts the change to frame t+1 (starting as a copy of frame t).
    Each level halves the map, down to about 4 on its short side (`levels`). At CPU scale its decoder gains 2 dB from
    its own actions over random ones, on pixels and on latents, where the transformer's gains nothing, and a DiT
    trained on its actions follows them (README, "Measured").
  - transformer: the frames' patch tokens go through a spatio-temporal transformer, causal in time, so the tokens of
    frame t+1 see x_1..x_{t+1}; a learned attention pooling (softmax of a score per token, `pool`: attn; mean for the
    ablation) sums them into the code, so it can weigh the few patches that moved. The decoder is a second
    transformer over x_1..x_t, each frame conditioned (adaLN) on the action taken after it. context_mask and pool are
    this architecture's alone.

Why a LAM collapses, and what this one does against it (each measure is a config field; 0 turns it off for ablations):
  - A decoder that sees x_t can copy it: the reconstruction is almost solved without the action, the action gets no
    gradient worth having, and every transition ends on one code. The conv decoder reads frames t-1 and t only, so
    less of the next frame is predictable from past motion than from a whole clip. The transformer's decoder reads
    the clip: there `context_mask`, in training, replaces this fraction of the past frames' patch tokens by a learned
    mask token, so copying the past leaves holes that only the action (what moved, and where) helps to fill.
  - A code that loses the first nearest-neighbour contests never wins again. vae.VectorQuantizer compares small
    (`code_dim`) l2-normalised codes by cosine similarity, so no code is out of reach by its norm, and restarts a code
    idle for `dead_after` steps onto an encoder output of the batch.
  - `usage_weight`: KL(batch-average soft assignment || uniform), the soft assignment being the softmax of the cosine
    similarities to the codes / `temperature`. It is differentiable where the argmax of VQ is not, so it pulls the
    encoder outputs apart before a code dies rather than after.
  - `batch_norm`: when transitions look alike, the encoder's codes share a large common part and differ by little;
    by cosine similarity they all land on one or two codes, and the usage term, which then sees near-uniform soft
    assignments, is already satisfied (about 1e-6 at Breakout's collapse). Centring and scaling each code dimension
    over the batch (BatchNorm without a learned scale or shift; its running statistics at inference) removes the
    common part, so the quantiser compares what differs. The statistics are those of each process's micro-batch.
  - `motion_weight`: the squared error of a pixel (or latent) is weighted by 1 + motion_weight * |x_{t+1} - x_t|. Static
    background dominates a plain MSE and needs no action; motion is exactly what the action must explain.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from transformer import STTransformer
from vae import VectorQuantizer, code_counts


@dataclass
class LAMConfig:
    input: str = "pixels"       # pixels (image_size, patch) or latents (rows, cols, latent_dim: the ViT-VAE's)
    image_size: int = 64
    patch: int = 8
    rows: int = 11
    cols: int = 20
    latent_dim: int = 48
    dim: int = 512
    depth: int = 8              # blocks of the encoder, and again of the decoder
    heads: int = 8              # (dim // heads) % 4 == 0: 2-D RoPE splits each head in four
    num_actions: int = 8
    code_dim: int = 16
    commitment: float = 0.25
    dead_after: int = 50        # training steps a code may go unused before it is restarted; 0 = never
    context_mask: float = 0.5   # fraction of the decoder's past patch tokens hidden in training; 0 = off
    usage_weight: float = 0.1   # weight of KL(batch code distribution || uniform); 0 = off
    temperature: float = 0.1    # of the soft assignment used by the usage term
    batch_norm: bool = True     # centre and scale the code per dimension over the batch before quantising
    motion_weight: float = 4.0  # extra reconstruction weight on what changes; 0 = plain MSE
    pool: str = "attn"          # frame t+1's patch features -> action code: attn (learned scores) or mean
    arch: str = "conv"          # conv: convolutional inverse and forward dynamics on 3 frames; or transformer
    width: int = 64             # conv: channels of the first level (then twice that)

    @property
    def grid(self):  # (rows, cols) of the token grid
        if self.input == "latents":
            return self.rows, self.cols
        return self.image_size // self.patch, self.image_size // self.patch

    @property
    def token_dim(self):  # P: numbers per token
        return self.latent_dim if self.input == "latents" else 3 * self.patch ** 2

    @property
    def levels(self):  # conv: stride-2 levels, down to a map of about 4 on its short side (64x64: 4, 11x20: 2)
        side = self.image_size if self.input == "pixels" else min(self.rows, self.cols)
        levels = 0
        while side > 4:
            side, levels = (side + 1) // 2, levels + 1
        return max(levels, 1)


PRESETS = {
    "tiny": LAMConfig(dim=64, depth=2, heads=4, width=32),
    "default": LAMConfig(),
}


class LatentActionModel(nn.Module, PyTorchModelHubMixin):
    """Clips (B, T, 3, H, W) in [-1, 1], or (B, T, N, P) latents -> latent actions (B, T - 1). Saved and loaded with
    utils.save_model / utils.load_model."""

    def __init__(self, config: LAMConfig):
        super().__init__()
        if config.image_size % config.patch or not 0 <= config.context_mask < 1 or config.pool not in ("attn", "mean") \
                or config.input not in ("pixels", "latents") or config.arch not in ("transformer", "conv"):
            raise ValueError(f"patch {config.patch} must divide image_size {config.image_size}, context_mask "
                             f"{config.context_mask} lie in [0, 1), pool {config.pool!r} be attn or mean, input "
                             f"{config.input!r} pixels or latents and arch {config.arch!r} transformer or conv")
        self.config = config
        c, (rows, cols) = config, config.grid
        channels = 3 if c.input == "pixels" else c.latent_dim  # of the frames as images (conv)
        if c.arch == "conv":
            self.conv_encoder = ConvEncoder(3 * channels, c.width, c.levels, c.code_dim)
        else:
            self.enc_embed = nn.Linear(c.token_dim, c.dim)
            self.enc_cond = nn.Parameter(0.02 * torch.randn(c.dim))  # nothing conditions the encoder: a learned constant
            self.encoder = STTransformer(c.dim, c.depth, c.heads, rows, cols)
            self.pool_score = nn.Linear(c.dim, 1) if c.pool == "attn" else None
            self.to_code = nn.Linear(c.dim, c.code_dim)
        # batch_norm's running statistics, for inference (kept whether it is on or not: one state dict)
        self.register_buffer("code_mean", torch.zeros(c.code_dim))
        self.register_buffer("code_var", torch.ones(c.code_dim))
        # The VQ's dead_after counts steps; 0 (off) becomes "never", a count no run reaches.
        self.vq = VectorQuantizer(c.num_actions, c.code_dim, c.commitment, c.dead_after or 2 ** 62)
        if c.arch == "conv":
            self.action_embed = nn.Linear(c.code_dim, c.width)
            self.conv_decoder = ConvDecoder(2 * channels, channels, c.width, c.levels)
            return
        self.dec_embed = nn.Linear(c.token_dim, c.dim)
        # Without a context mask nothing uses the mask token: frozen, so DDP does not wait for its gradient.
        self.mask_token = nn.Parameter(0.02 * torch.randn(c.dim), requires_grad=c.context_mask > 0)
        self.action_embed = nn.Linear(c.code_dim, c.dim)
        self.decoder = STTransformer(c.dim, c.depth, c.heads, rows, cols)
        self.to_tokens = nn.Linear(c.dim, c.token_dim)

    def tokens(self, frames):  # pixels (B, T, 3, H, W) or latents (B, T, N, P) -> (B, T, N, P)
        if self.config.input == "latents":
            return frames
        p = self.config.patch
        return rearrange(frames, "b t c (h p) (w q) -> b t (h w) (p q c)", p=p, q=p)

    @property
    def decoder_frames(self):  # past frames the decoder reads per transition: conv t-1 and t; the transformer all
        return 2 if self.config.arch == "conv" else None

    def frames_of(self, tokens):  # the inverse of tokens: (B, T, N, P) -> pixels (B, T, 3, H, W), or latents as they are
        if self.config.input == "latents":
            return tokens
        p, rows = self.config.patch, self.config.grid[0]
        return rearrange(tokens, "b t (h w) (p q c) -> b t c (h p) (w q)", h=rows, p=p, q=p)

    def images(self, frames):  # pixels (B, T, 3, H, W) or latents (B, T, N, P) -> (B, T, channels, rows, cols)
        if self.config.input == "pixels":
            return frames
        return rearrange(frames, "b t (h w) p -> b t p h w", h=self.config.rows)

    def image_tokens(self, images):  # the inverse of images, then tokens: (B, T, channels, rows, cols) -> (B, T, N, P)
        if self.config.input == "pixels":
            return self.tokens(images)
        return rearrange(images, "b t p h w -> b t (h w) p")

    def encode(self, frames):
        """Clips -> unquantised codes (B, T - 1, C) of the transitions; code t sees frames 0..t+1 only (conv: frames
        t-1, t, t+1)."""
        b, t = frames.shape[:2]
        if self.config.arch == "conv":
            x = self.images(frames)
            before = torch.cat([x[:, :1], x[:, :-2]], dim=1)  # frame t-1 of each transition (the first: frame 0)
            z = self.conv_encoder(torch.cat([before, x[:, :-1], x[:, 1:]], dim=2).flatten(0, 1)).unflatten(0, (b, t - 1))
        else:
            x = self.enc_embed(self.tokens(frames))  # (B, T, N, D)
            x = self.encoder(x, self.enc_cond.expand(b, t, -1))[:, 1:]  # (B, T - 1, N, D): frame t+1's, seeing the past
            if self.pool_score is None:
                z = self.to_code(x.mean(2))
            else:
                z = self.to_code((F.softmax(self.pool_score(x), dim=2) * x).sum(2))  # (B, T - 1, C)
        if not self.config.batch_norm:
            return z
        return F.batch_norm(z.flatten(0, 1), self.code_mean, self.code_var, training=self.training).view_as(z)

    def action_embedding(self, actions):  # (...) int64 -> (..., D), the decoder's condition for those actions
        return self.action_embed(self.vq.lookup(actions))

    def decode(self, past, cond):
        """past: frames x_1..x_t of the clips (T - 1 of them), cond (B, T - 1, D) -> predicted tokens of x_2..x_{t+1}
        (B, T - 1, N, P). conv: from frames t-1 and t only, as x_t plus a predicted change."""
        if self.config.arch == "conv":
            x = self.images(past)  # (B, T - 1, channels, rows, cols)
            pair = torch.cat([torch.cat([x[:, :1], x[:, :-1]], dim=1), x], dim=2).flatten(0, 1)
            change = self.conv_decoder(pair, cond.flatten(0, 1)).unflatten(0, x.shape[:2])
            return self.image_tokens(x + change)
        x = self.dec_embed(self.tokens(past))  # (B, T - 1, N, D)
        if self.training and self.config.context_mask > 0:
            hidden = torch.rand(x.shape[:3], device=x.device) < self.config.context_mask  # (B, T - 1, N)
            x = torch.where(hidden[..., None], self.mask_token.to(x.dtype), x)
        return self.to_tokens(self.decoder(x, cond))

    def forward(self, frames):
        """Clips of T >= 2 frames -> (loss, logs)."""
        c = self.config
        z = self.encode(frames)  # (B, T - 1, C)
        quantized, indices, vq_loss, stats = self.vq(z)  # (B, T - 1, C), (B, T - 1)
        pred = self.decode(frames[:, :-1], self.action_embed(quantized))  # (B, T - 1, N, P)

        target, previous = self.tokens(frames[:, 1:]), self.tokens(frames[:, :-1])  # (B, T - 1, N, P)
        error = (pred.float() - target) ** 2
        weight = 1 + c.motion_weight * (target - previous).abs()
        recon = (weight * error).sum() / weight.sum()

        # Soft assignment of each transition to the codes; its batch average should use every code.
        similarity = F.normalize(z.float(), dim=-1) @ self.vq.codes().float().t()  # (B, T - 1, K)
        average = F.softmax(similarity / c.temperature, dim=-1).mean((0, 1))  # (K,)
        usage_loss = (average * average.clamp_min(1e-12).log()).sum() + math.log(c.num_actions)

        loss = recon + vq_loss + c.usage_weight * usage_loss
        code_usage = code_counts(indices, c.num_actions) / indices.numel()  # (K,)
        logs = {"recon": error.mean().detach(), "vq": vq_loss.detach(), "usage_loss": usage_loss.detach(), **stats,
                "code_usage": code_usage}
        return loss, logs

    @torch.no_grad()
    def infer_actions(self, frames, clip_len=None):
        """Clips -> (B, T - 1) int64 latent actions in [0, num_actions); never restarts codes. With clip_len, the
        clips are cut into pieces of clip_len frames overlapping by one (the length the LAM was trained on), so that
        each transition is labelled seeing only its piece's frames up to it, as dataset.label_transitions does."""
        if clip_len is None:
            return self.vq.nearest(self.encode(frames))
        starts = range(0, frames.shape[1] - 1, clip_len - 1)
        return torch.cat([self.infer_actions(frames[:, s:s + clip_len]) for s in starts], dim=1)


def conv_level(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3 if stride == 1 else 4, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class ConvEncoder(nn.Module):
    """conv inverse dynamics: frames t-1, t, t+1 stacked (M, 3 channels, H, W) -> code (M, C). Stride-2 levels, then
    the feature map pooled to 4x4 and read by a linear layer (where things moved matters: no global average)."""

    def __init__(self, c_in, width, levels, code_dim):
        super().__init__()
        widths = [width] + [2 * width] * (levels - 1)
        self.levels = nn.Sequential(*[conv_level(a, b, 2) for a, b in zip([c_in] + widths, widths)])
        self.to_code = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * widths[-1], code_dim))

    def forward(self, x):
        return self.to_code(self.levels(x))


class ConvDecoder(nn.Module):
    """conv forward dynamics: frames t-1, t stacked (M, 2 channels, H, W) and the action's embedding (M, width) ->
    the change from frame t to t+1 (M, channels, H, W). A U-Net; the action is tiled over every level's input, so
    each position reads it directly."""

    def __init__(self, c_in, c_out, width, levels):
        super().__init__()
        widths = [width] + [2 * width] * (levels - 1)
        self.down = nn.ModuleList([conv_level(a + width, b, 2) for a, b in zip([c_in] + widths, widths)])
        outs = widths[-2::-1] + [width]  # the up levels, deepest first; each but the first also reads a skip
        ins = [widths[-1]] + [o + skip for o, skip in zip(outs, widths[-2::-1])]
        self.up = nn.ModuleList([conv_level(a + width, b, 1) for a, b in zip(ins, outs)])
        self.out = nn.Conv2d(width, c_out, 3, 1, 1)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)  # start as a copy of frame t

    def forward(self, x, action):  # (M, c_in, H, W), (M, width) -> (M, c_out, H, W)
        def tile(h):
            return torch.cat([h, action[:, :, None, None].expand(-1, -1, *h.shape[-2:]).to(h.dtype)], dim=1)
        size, skips = x.shape[-2:], []
        for level in self.down:
            x = level(tile(x))
            skips.append(x)
        for i, level in enumerate(self.up):
            if i:
                skip = skips[-1 - i]
                x = torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1)
            x = level(tile(x))
        return self.out(F.interpolate(x, size=size, mode="nearest"))
