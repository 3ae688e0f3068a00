"""The ViT-VAE of the latent diffusion pipeline: a 320x180 RGB frame <-> 220 latent vectors of 48 numbers (one per
16 px patch of an 11 x 20 grid), 16.4x fewer numbers than pixels. dit.py models videos in this latent space.

Legend: B batch, T frames, N = rows * cols patches (11 * 20 = 220), D model dim, L latent dim (48),
        C colour channels, H W frame height and width, P patch side (16), Q height of the bottom patch row (20).

The 4 rows that 16 does not divide. 180 = 11 * 16 + 4: pixel rows 0..159 are ten rows of 16x16 patches and the
bottom patch row is 20 px tall (rows 160..179, 20x16 patches). That row has its own patch embedding in the encoder
and its own output projection in the decoder, so every pixel is encoded and reconstructed and nothing is resampled;
the grid stays 11 x 20 and the bottom row's tokens are ordinary tokens of the transformer (2-D RoPE knows their row).

Encoder: patch embedding -> non-causal ViT blocks (transformer.Attention: QK-norm, SDPA, 2-D RoPE over the grid) ->
per-patch posterior mean and log-variance. Decoder: latent -> ViT blocks (twice as many: decoding is the harder half)
-> per-patch pixels -> a small residual conv refinement across patch borders (hides the seams) -> tanh.
Loss: pixel MSE (weighted towards the player's box with a focus) + beta * KL (mean over latent numbers) + optional
frame-difference MSE between consecutive frames.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from transformer import Attention, grid_angles, init_linears
from utils import box_weights


@dataclass
class VAEConfig:
    height: int = 180
    width: int = 320
    patch: int = 16
    latent_dim: int = 48
    dim: int = 512
    heads: int = 8
    encoder_depth: int = 6
    decoder_depth: int = 12
    mlp_ratio: float = 4.0
    refine_channels: int = 64   # width of the conv refinement after un-patchifying
    # Where the player sits, for a game whose camera keeps it at one place: [top, left, bottom, right] in pixels, whose
    # reconstruction error weighs focus_weight times the rest's (as the Genie tokenizer's focus, vae.TokenizerConfig).
    focus: list = field(default_factory=list)
    focus_weight: float = 1.0

    @property
    def rows(self):  # the last patch row also takes the height % patch rows left over
        return self.height // self.patch

    @property
    def cols(self):
        return self.width // self.patch

    @property
    def tokens(self):
        return self.rows * self.cols

    @property
    def focus_patches(self):  # the patches the focus touches, [top, left, bottom, right]; [] with no focus
        if not self.focus:
            return []
        top, left, bottom, right = self.focus
        row = lambda y: min(y // self.patch, self.rows - 1)  # the bottom row also takes the rows left over
        return [row(top), left // self.patch, row(bottom - 1) + 1, -(-right // self.patch)]

    @property
    def bottom(self):  # height of the bottom patch row
        return self.patch + self.height % self.patch


PRESETS = {
    "tiny": VAEConfig(dim=64, heads=2, encoder_depth=1, decoder_depth=2, refine_channels=8),
    "default": VAEConfig(),
}


class Block(nn.Module):
    """Pre-norm ViT block: attention among all patches of a frame (not causal), then an MLP."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x, angles):  # x (B, N, D)
        x = x + self.attention(self.norm1(x), angles)
        return x + self.mlp(self.norm2(x))


class ViTVAE(nn.Module, PyTorchModelHubMixin):
    """Frames (B, 3, H, W) in [-1, 1] <-> latents (B, N, L). Saved and loaded with utils.save_model / load_model."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = self.config = config
        if c.width % c.patch or c.height < c.patch:
            raise ValueError(f"patches of {c.patch} px must tile the width {c.width} and fit in the height {c.height}")
        if c.dim % c.heads or (c.dim // c.heads) % 4:
            raise ValueError(f"dim {c.dim} / heads {c.heads} must be a whole multiple of 4 (2-D RoPE splits each "
                             f"head dimension in four)")
        p, q, d = c.patch, c.bottom, c.dim
        self.embed_top = nn.Linear(3 * p * p, d)
        self.embed_bottom = nn.Linear(3 * q * p, d)
        self.encoder = nn.ModuleList(Block(d, c.heads, c.mlp_ratio) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(d)
        self.to_posterior = nn.Linear(d, 2 * c.latent_dim)
        self.from_latent = nn.Linear(c.latent_dim, d)
        self.decoder = nn.ModuleList(Block(d, c.heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d)
        self.out_top = nn.Linear(d, 3 * p * p)
        self.out_bottom = nn.Linear(d, 3 * q * p)
        r = c.refine_channels
        self.refine = nn.Sequential(nn.Conv2d(3, r, 3, padding=1), nn.SiLU(), nn.Conv2d(r, r, 3, padding=1), nn.SiLU(),
                                    nn.Conv2d(r, 3, 3, padding=1))
        self.register_buffer("pixel_weight", box_weights(c.height, c.width, c.focus, c.focus_weight, "pixels"),
                             persistent=False)  # (H, W)
        self.initialize_weights()

    def initialize_weights(self):
        init_linears(self)
        # The pixels start flat grey rather than as per-pixel noise the first steps would have to undo, and the
        # refinement starts as the identity.
        for layer in (self.out_top, self.out_bottom, self.refine[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def angles(self, device):
        return grid_angles(self.config.rows, self.config.cols, self.config.dim // self.config.heads, device)

    def encode(self, frames):
        """frames (B, 3, H, W) in [-1, 1] -> posterior mu, logvar, each (B, N, L)."""
        c = self.config
        cut = (c.rows - 1) * c.patch  # 160: the pixel rows of the square patches
        top = rearrange(frames[:, :, :cut], "b c (r p) (w q) -> b (r w) (c p q)", p=c.patch, q=c.patch)  # (B, 200, 3PP)
        bottom = rearrange(frames[:, :, cut:], "b c p (w q) -> b w (c p q)", q=c.patch)  # (B, 20, 3QP)
        x = torch.cat([self.embed_top(top), self.embed_bottom(bottom)], dim=1)  # (B, N, D), rows in order
        angles = self.angles(frames.device)
        for block in self.encoder:
            x = block(x, angles)
        mu, logvar = self.to_posterior(self.encoder_norm(x)).chunk(2, dim=-1)  # (B, N, L) each
        return mu, logvar.clamp(-30, 20)  # exp(logvar) stays finite in bf16

    def decode(self, z):
        """z (B, N, L) -> frames (B, 3, H, W) in [-1, 1]."""
        c = self.config
        x = self.from_latent(z)  # (B, N, D)
        angles = self.angles(z.device)
        for block in self.decoder:
            x = block(x, angles)
        x = self.decoder_norm(x)
        top = rearrange(self.out_top(x[:, :-c.cols]), "b (r w) (c p q) -> b c (r p) (w q)", w=c.cols, c=3,
                        p=c.patch)  # (B, 3, 160, W)
        bottom = rearrange(self.out_bottom(x[:, -c.cols:]), "b w (c p q) -> b c p (w q)", c=3,
                           q=c.patch)  # (B, 3, Q, W)
        pixels = torch.cat([top, bottom], dim=2)  # (B, 3, H, W)
        return torch.tanh(pixels + self.refine(pixels))

    def forward(self, frames, beta=0.0, diff_weight=0.0):
        """frames (B, T, 3, H, W) in [-1, 1], T = 1, or 2 for the frame-difference loss -> (loss, logs).

        beta weighs the KL (mean over the B * T * N * L latent numbers) against the pixel MSE (mean over pixels);
        diff_weight the MSE between the reconstructed and the true change from frame 0 to frame 1, which keeps the
        small things that move (the character) from being averaged away with the static background.
        """
        b, t = frames.shape[:2]
        if diff_weight > 0 and t != 2:
            raise ValueError(f"the frame-difference loss needs windows of 2 frames, not {t}")
        x = rearrange(frames, "b t c h w -> (b t) c h w")
        mu, logvar = self.encode(x)  # (BT, N, L)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = self.decode(z)  # (BT, 3, H, W)
        mse = F.mse_loss(recon.float(), x.float())  # logged unweighted, so that runs with and without a focus compare
        mu, logvar = mu.float(), logvar.float()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = ((recon.float() - x.float()) ** 2 * self.pixel_weight).mean() if self.config.focus else mse
        loss = loss + beta * kl
        # PSNR of the batch's mean error, on [0, 1] images (the [-1, 1] range doubles the error, hence 4 / mse);
        # the std of mu is what the DiT's latent scale will undo, so its drift is worth watching
        # (all tensors: reading them would make the host wait for the GPU; train_loop reads them when it logs)
        logs = {"mse": mse.detach(), "kl": kl.detach(), "psnr": 10 * torch.log10(4 / mse.detach().clamp_min(1e-10)),
                "mu_std": mu.detach().std()}
        if diff_weight > 0:
            recon = rearrange(recon, "(b t) c h w -> b t c h w", b=b)
            diff = F.mse_loss((recon[:, 1] - recon[:, 0]).float(), (frames[:, 1] - frames[:, 0]).float())
            loss = loss + diff_weight * diff
            logs["diff"] = diff.detach()
        return loss, logs
