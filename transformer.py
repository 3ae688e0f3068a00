"""The spatio-temporal transformer shared by the world models (lam.py, dynamics.py; dit.py builds on it too).

Legend: B batch, T frames, N tokens per frame (rows x cols), D model dim, H heads, K head dim, S sequences.

A block factorises attention, as in Genie's ST-transformer:
  1. spatial attention among the N tokens of each frame, with 2-D RoPE (half of each head rotates by row, half by
     column), so the model knows where a token sits in the frame;
  2. temporal attention among the frames at each token position, causal (a frame sees itself and earlier frames),
     with 1-D RoPE over the absolute frame index. The angles are computed from the positions on the fly, so there is
     no table to outgrow: a sliding window may run for any number of frames;
  3. an MLP.
Queries and keys are RMS-normalised (QK-norm) before RoPE, which keeps attention logits bounded in bf16.
Each sub-layer is modulated by a per-frame conditioning vector (adaLN-Zero: shift, scale and a gate initialised to
zero, so every block starts as the identity). The vector is computed once per frame, (B, T, D): the flow time for the
DiT, the latent action for the dynamics and LAM decoders, a learned constant where nothing conditions.

KV cache: during generation the frames of the context do not change, so their temporal keys and values are computed
once and reused; a new frame then runs only its own N tokens through the network. The cache is allocated once, with a
free slot after a ring of finished frames: each step of the new frame writes its keys there (no copy of the cache, as
a cat would make at every Euler or MaskGIT step), and `KVCache.commit()` moves the finished frame into the ring. So a
cached step has the same shapes and tensor addresses at every call: torch.compile can replay it as one CUDA graph.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def rope_angles(positions, dim, base=10000.0):
    """positions (L,) -> (cos, sin) of the rotation angles, each (L, dim // 2), for any position: no table."""
    freqs = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * freqs[None]
    return angles.cos(), angles.sin()


def grid_angles(rows, cols, dim, device=None):
    """2-D RoPE for a rows x cols grid, tokens in row-major order: (cos, sin), each (rows * cols, dim // 2)."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    (row_cos, row_sin), (col_cos, col_sin) = rope_angles(r.flatten(), dim // 2), rope_angles(c.flatten(), dim // 2)
    return torch.cat([row_cos, col_cos], dim=-1), torch.cat([row_sin, col_sin], dim=-1)


def apply_rope(x, angles):
    """x (..., L, K), angles (cos, sin) each (L, K // 2): rotate consecutive pairs of channels. The cosines and sines
    are computed once per forward pass, not once per attention layer. Pair (x1, x2) becomes (x1 cos - x2 sin,
    x2 cos + x1 sin), computed as x * cos + swapped(x) * (-sin, sin): three passes over x, where slicing out x1 and x2
    and stacking the halves back took seven (2.5x slower on a CPU in bf16)."""
    cos = angles[0].to(x.dtype).repeat_interleave(2, dim=-1)  # (L, K)
    sin = angles[1].to(x.dtype)
    sin = torch.stack([-sin, sin], dim=-1).flatten(-2)  # (L, K)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # each pair (x2, x1)
    return torch.addcmul(x * cos, swapped, sin)


def init_linears(module):
    """Xavier-uniform weights and zero biases for every nn.Linear inside `module` (the ViT/DiT convention)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def in_dtype(norm, x):
    """An nn.RMSNorm applied with its weight in x's dtype: under bf16 autocast x is bf16 and the weight float32, a
    mismatch that keeps torch off its fused kernel (and warns)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)  # shift + x * (1 + scale) in one pass over x


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.RMSNorm(dim // heads)
        self.k_norm = nn.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, angles, causal=False, past=None, visible=None):
        """x (S, L, D); angles (cos, sin) each (L, K/2) -> (S, L, D). With past, a layer of a KVCache: (k, v) each
        (S, H, slots, K), L = 1: the new position's keys go to the free last slot and it attends to the `visible`
        (slots,) ones."""
        q, k, v = rearrange(self.qkv(x), "s l (three h k) -> three s h l k", three=3, h=self.heads)
        q, k = apply_rope(in_dtype(self.q_norm, q), angles), apply_rope(in_dtype(self.k_norm, k), angles)
        mask = None
        if past is not None:
            past[0][:, :, -1:] = k
            past[1][:, :, -1:] = v
            (k, v), mask, causal = past, visible[None], False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (S, H, L, K)
        return self.proj(rearrange(out, "s h l k -> s l (h k)"))


class STBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.spatial = Attention(dim, heads)
        self.temporal = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 9 * dim)  # shift, scale, gate for each of the three sub-layers

    def forward(self, x, cond, space_angles, time_angles, past=None, visible=None):
        """x (B, T, N, D), cond (B, T, D) -> (B, T, N, D)."""
        b = x.shape[0]
        mods = self.modulation(F.silu(cond))[:, :, None]  # (B, T, 1, 9D): once per frame, not per token
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = mods.chunk(9, dim=-1)
        h = rearrange(modulate(self.norm1(x), shift1, scale1), "b t n d -> (b t) n d")
        h = self.spatial(h, space_angles)
        x = torch.addcmul(x, gate1, rearrange(h, "(b t) n d -> b t n d", b=b))  # x + gate * h in one pass
        h = rearrange(modulate(self.norm2(x), shift2, scale2), "b t n d -> (b n) t d")
        h = self.temporal(h, time_angles, causal=True, past=past, visible=visible)
        x = torch.addcmul(x, gate2, rearrange(h, "(b n) t d -> b t n d", b=b))
        return torch.addcmul(x, gate3, self.mlp(modulate(self.norm3(x), shift3, scale3)))


class KVCache:
    """Temporal keys and values of the last `max_frames` finished frames, allocated once: per block a key and a value
    tensor (S, H, max_frames + 1, K), a ring of max_frames slots and a free last slot for the frame being made. Keys
    keep the rotary angle of their absolute frame index, so the order of the ring does not matter to attention;
    `visible` masks the slots not filled yet. The new frame's position lives on the device, so a compiled step reads
    no Python number that changes from frame to frame. (One tensor per block, not one for all: torch.compile writes
    into separate tensors in place, but copies a stacked one whole at every step.)"""

    def __init__(self, max_frames, depth, sequences, heads, head_dim, dtype, device):
        self.max_frames = max_frames
        self.keys, self.values = ([torch.empty(sequences, heads, max_frames + 1, head_dim, dtype=dtype, device=device)
                                   for _ in range(depth)] for _ in range(2))
        self.visible = torch.empty(max_frames + 1, dtype=torch.bool, device=device)
        self.next_position = torch.empty(1, dtype=torch.long, device=device)
        for tensor in self.keys + self.values + [self.visible, self.next_position]:
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs may write into them in place
        self.reset()

    def reset(self):
        """Empty the cache in place: the same tensors (and addresses) serve the next sequence."""
        self.position = 0  # the absolute index of the next frame
        for tensor in self.keys + self.values:
            tensor.zero_()  # zeros, not garbage: a masked slot's NaN would still poison p @ v
        self.visible.zero_()
        self.visible[-1] = True  # the new frame sees itself
        self.next_position.zero_()

    def fits(self, depth, sequences, dtype, device):
        keys = self.keys[0]
        return (len(self.keys), keys.shape[0], keys.dtype, keys.device) == (depth, sequences, dtype, device)

    def __len__(self):
        return min(self.position, self.max_frames)

    def layer(self, block):
        return self.keys[block], self.values[block]

    def commit(self):
        """Keep the frame whose keys are in the free slot: it takes the oldest frame's place in the ring."""
        slot = self.position % self.max_frames
        for tensor in self.keys + self.values:
            tensor[:, :, slot] = tensor[:, :, -1]
        self.visible[slot] = True
        self.position += 1
        self.next_position += 1


class STTransformer(nn.Module):
    """A stack of STBlocks over (B, T, N, D) token grids of `rows` x `cols`, with a final adaLN-modulated norm."""

    def __init__(self, dim, depth, heads, rows, cols, mlp_ratio=4.0):
        super().__init__()
        if dim % heads or (dim // heads) % 4:
            raise ValueError(f"dim {dim} / heads {heads} must be a whole multiple of 4 (2-D RoPE splits each head "
                             f"dimension in four)")
        self.rows, self.cols, self.head_dim = rows, cols, dim // heads
        self.blocks = nn.ModuleList(STBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(dim, 2 * dim)
        self.initialize_weights()

    def initialize_weights(self):
        init_linears(self)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.modulation_out.weight)
        nn.init.zeros_(self.modulation_out.bias)

    def new_cache(self, batch, max_frames, device, reuse=None):
        """An empty KVCache for `batch` sequences of frames, in the dtype the keys will have (bf16 under autocast):
        `reuse`, emptied in place, when it has that size and dtype; else a new one."""
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.modulation_out.weight.dtype)
        sequences = batch * self.rows * self.cols
        if reuse is not None and reuse.max_frames == max_frames and reuse.fits(len(self.blocks), sequences, dtype,
                                                                                torch.device(device)):
            reuse.reset()
            return reuse
        heads = self.blocks[0].temporal.heads
        return KVCache(max_frames, len(self.blocks), sequences, heads, self.head_dim, dtype, device)

    def forward(self, x, cond, cache=None):
        """x (B, T, N, D), cond (B, T, D) -> (B, T, N, D).

        With a cache: one frame (T = 1) after the cached ones, which it attends to; its keys and values wait in the
        cache's free slot, and join the cache if the caller then calls cache.commit().
        """
        space = grid_angles(self.rows, self.cols, self.head_dim, x.device)
        if cache is None:
            time = rope_angles(torch.arange(x.shape[1], device=x.device), self.head_dim)
        else:
            assert x.shape[1] == 1, "a cached call takes one new frame"
            time = rope_angles(cache.next_position, self.head_dim)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, space, time, *((cache.layer(i), cache.visible) if cache is not None else ()))
        shift, scale = self.modulation_out(F.silu(cond))[:, :, None].chunk(2, dim=-1)
        return modulate(self.norm_out(x), shift, scale)
