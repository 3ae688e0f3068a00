"""The video tokenizer of the Genie pipeline: a convolutional VQ-VAE that turns each 64x64 RGB frame into a 16x16 grid
of discrete tokens (indices into a codebook of 1024 codes) and decodes the tokens back into the frame. The dynamics
model predicts these tokens; lam.py reuses VectorQuantizer for its latent actions.

Shapes: b batch, h w token grid (image_size / 4), d code dim, n codes.

Keeping the codebook alive. A VQ-VAE trained plainly ends up using a few of its codes:
a code that starts far from every encoder output never wins the nearest-neighbour search, so it never receives a
gradient and stays where it is. Each token then carries few bits and the dynamics model has little to predict with.
Three measures, after ViT-VQGAN (Yu et al. 2021) and jafar:
  - small codes compared by cosine similarity: encoder outputs and codes are l2-normalised to the unit sphere of a
    32-dim space, so no code is out of reach by its norm and the sphere is small enough for the codes to tile it;
  - dead-code restart: a code unused for `dead_after` optimisation steps is moved onto a random encoder output of the
    step's batch, where it is chosen at once;
  - usage and perplexity are measured on every batch, so a collapse shows in the training log as it happens.
Steps, not forward passes, are counted: training-mode forwards add up the codes they use and keep candidate restart
points, and `end_step`, which step.train_step calls once per optimisation step, ages the idle codes and restarts the
dead ones. A step cut into micro-batches (the memory planner's, on GPUs) so counts as the one step it is. Under
torch.distributed the usage counts are summed over ranks and the restart points come from rank 0 in end_step, so every
rank keeps the same codebook with one pair of collectives per step.
Nothing here waits for the GPU (no .item(), no data-dependent shapes), so a training step runs without a host sync.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin

from utils import box_weights


@dataclass
class TokenizerConfig:
    image_size: int = 64
    channels: int = 64        # width of the first stage; stage i has channels * channel_mult[i]
    channel_mult: list = field(default_factory=lambda: [1, 2, 3])  # a stride-2 step between stages: 64 -> 16
    res_blocks: int = 2       # residual blocks per stage
    num_codes: int = 1024
    code_dim: int = 8         # small codes compared by cosine: +0.5 dB at the tiny preset over 32 (README)
    commitment: float = 0.25  # weight of the loss that pulls encoder outputs towards their codes
    dead_after: int = 100     # training steps a code may go unused before it is restarted
    # Where the player sits, for a game whose camera keeps it at one place: [top, left, bottom, right] in pixels, whose
    # reconstruction error weighs focus_weight times the rest's. Plain MSE spends the codes on the background and blurs
    # the few pixels that show which way the player faces (CoinRun: [28, 20, 44, 44] and 10; docs/results.md).
    focus: list = field(default_factory=list)
    focus_weight: float = 1.0

    @property
    def grid(self):  # side of the token grid
        return self.image_size // 2 ** (len(self.channel_mult) - 1)

    @property
    def focus_tokens(self):  # the tokens whose pixels the focus touches, [top, left, bottom, right]; [] with no focus
        if not self.focus:
            return []
        scale = self.image_size // self.grid
        top, left, bottom, right = self.focus
        return [top // scale, left // scale, -(-bottom // scale), -(-right // scale)]


PRESETS = {
    "tiny": TokenizerConfig(channels=16, channel_mult=[1, 2, 2], res_blocks=1, dead_after=20),
    "default": TokenizerConfig(),
}


# ----------------------------------------------------------------------------- vector quantizer

class VectorQuantizer(nn.Module):
    """Cosine (l2-normalised) nearest-neighbour VQ with dead-code restart. Reused by lam.py for the latent actions."""

    def __init__(self, num_codes: int, dim: int, commitment: float = 0.25, dead_after: int = 100):
        super().__init__()
        self.commitment, self.dead_after = commitment, dead_after
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))
        # Optimisation steps since each code was last chosen. Not saved: a loaded model starts counting afresh.
        self.register_buffer("idle", torch.zeros(num_codes, dtype=torch.long), persistent=False)
        # This step's uses of each code (n,) and a restart point for each (n, d), set by its training-mode forwards.
        # Plain attributes, not buffers: DDP would overwrite them with rank 0's at every forward.
        self.step_counts = self.restart_points = None

    def codes(self):
        return F.normalize(self.codebook, dim=-1)  # (n, d)

    def nearest(self, z):  # z (..., d) -> indices (...)
        # The norm of z scales every similarity alike, so z need not be normalised to find its code. Float32 even under
        # autocast: bf16 similarities tie among nearby codes, and argmax gives every tie to the lowest index.
        with torch.autocast(z.device.type, enabled=False):
            return (z.float() @ self.codes().float().t()).argmax(-1)

    def lookup(self, indices):  # indices (...) -> normalised codes (..., d)
        return F.embedding(indices, self.codes())

    def forward(self, z):  # z (..., d)
        z = F.normalize(z, dim=-1)
        indices = self.nearest(z)  # (...)
        codes = self.lookup(indices)  # (..., d)
        # Codebook term moves the codes, commitment term keeps the encoder near them; both on the unit sphere.
        loss = F.mse_loss(codes, z.detach()) + self.commitment * F.mse_loss(z, codes.detach())
        quantized = z + (codes - z).detach()  # the codes' values, z's gradient (straight-through)

        counts = code_counts(indices, len(self.idle)).float()  # (n,)
        if self.training:
            flat = rearrange(z.detach(), "... d -> (...) d")
            self.restart_points = flat[torch.randint(len(flat), (len(self.idle),), device=flat.device)].float()
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        probs = counts / counts.sum()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        stats = {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}
        return quantized, indices, loss, stats

    @torch.no_grad()
    def end_step(self):
        """An optimisation step ended (step.train_step): codes unused in all of its forwards age by one, and those idle
        for dead_after steps move onto this step's restart points. A masked copy for every code: the same work whether
        0 or 100 codes are dead, so the host never has to ask the GPU how many are."""
        if not self.training or self.step_counts is None:
            return
        counts, points = self.step_counts, self.restart_points
        self.step_counts = self.restart_points = None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.broadcast(points, src=0)
        self.idle += 1
        self.idle.masked_fill_(counts > 0, 0)
        dead = self.idle >= self.dead_after  # (n,)
        self.codebook.copy_(torch.where(dead[:, None], points.to(self.codebook.dtype), self.codebook))
        self.idle.masked_fill_(dead, 0)


def code_counts(indices, num_codes):
    """How often each code occurs in indices (any shape) -> (num_codes,) int64. torch.bincount would ask the GPU for
    the largest index first (a host sync); a scatter into a fixed-size array does not."""
    flat = indices.flatten()
    return torch.zeros(num_codes, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


# ----------------------------------------------------------------------------- encoder and decoder

class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                   nn.GroupNorm(8, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


def stage(cin, cout, blocks):
    return [ResBlock(cin, cout)] + [ResBlock(cout, cout) for _ in range(blocks - 1)]


def encoder(cfg):  # (b, 3, H, W) -> (b, d, h, w)
    widths = [cfg.channels * m for m in cfg.channel_mult]
    layers, width = [nn.Conv2d(3, widths[0], 3, padding=1)], widths[0]
    for i, w in enumerate(widths):
        if i > 0:
            layers.append(nn.Conv2d(width, width, 4, stride=2, padding=1))  # halves the side
        layers += stage(width, w, cfg.res_blocks)
        width = w
    return nn.Sequential(*layers, nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, cfg.code_dim, 1))


def decoder(cfg):  # (b, d, h, w) -> (b, 3, H, W)
    widths = [cfg.channels * m for m in cfg.channel_mult][::-1]
    layers, width = [nn.Conv2d(cfg.code_dim, widths[0], 3, padding=1)], widths[0]
    for i, w in enumerate(widths):
        if i > 0:  # nearest upsampling then a conv, rather than a transposed conv, avoids checkerboard artefacts
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        layers += stage(width, w, cfg.res_blocks)
        width = w
    return nn.Sequential(*layers, nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer(nn.Module, PyTorchModelHubMixin):
    """Frames in [-1, 1] <-> token grids. Saved and loaded with utils.save_model / utils.load_model."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder(config)
        self.decoder = decoder(config)
        self.vq = VectorQuantizer(config.num_codes, config.code_dim, config.commitment, config.dead_after)
        self.register_buffer("pixel_weight", box_weights(config.image_size, config.image_size, config.focus,
                                                         config.focus_weight, "pixels"), persistent=False)

    @torch.no_grad()
    def encode(self, frames):  # (b, 3, H, W) -> indices (b, h, w) int64; never restarts codes
        # Channels-last input: a third faster on a CPU in bf16, a tenth in fp32 (oneDNN). Training keeps the default
        # layout, where channels-last measured slower in bf16.
        z = rearrange(self.encoder(frames.contiguous(memory_format=torch.channels_last)), "b d h w -> b h w d")
        return self.vq.nearest(z)

    def decode(self, indices):  # (b, h, w) -> frames (b, 3, H, W)
        codes = rearrange(self.vq.lookup(indices), "b h w d -> b d h w")
        return self.decoder(codes)

    def forward(self, frames):  # (b, 3, H, W) -> loss, logs
        z = rearrange(self.encoder(frames), "b d h w -> b h w d")
        quantized, _, vq_loss, stats = self.vq(z)
        recon = self.decoder(rearrange(quantized, "b h w d -> b d h w"))  # (b, 3, H, W)
        recon_loss = F.mse_loss(recon, frames)  # logged unweighted, so that runs with and without a focus compare
        loss = ((recon - frames) ** 2 * self.pixel_weight).mean() if self.config.focus else recon_loss
        return loss + vq_loss, {"recon": recon_loss.detach(), "vq": vq_loss.detach(), **stats}
