"""Causal DiT over sequences of VAE latent frames, trained with flow matching (the diffusion world model).

Legend: B batch, T frames, N = rows * cols latent tokens per frame (11 x 20 = 220), C latent channels (48),
D model dim, P context frames.

Flow matching, as in the seed: x_t = (1 - t) * x_0 + t * x_1 with x_0 ~ N(0, I) noise and x_1 the (unit-variance)
latents; t = 0 is pure noise, t = 1 data, and the model predicts the velocity v = x_1 - x_0. Every frame of a clip
draws its own t (diffusion forcing), and attention in time is causal, so at generation the context can sit at a high
t (context_t, slightly noisy) while the new frame is integrated from t = 0 to 1.

With `residual` (every preset) the network predicts the clean frame as the clean frame before it plus its output,
x_1' = x_prev + out, and the velocity follows from it, v = (x_1' - x_t) / (1 - t) (1 - t at least 0.05); the loss
is taken on x_1'. Most of a game frame is the frame before, so the untrained model starts by copying it (its output
layer starts at zero) and learns what changes; at the demo scale this gave +1.4-2.3 dB at t = 1 over predicting
the velocity directly (README, "Measured"). At generation x_prev is the last clean frame, the context's or the one just
generated.

Network: the spatio-temporal transformer of transformer.py (spatial attention over the 220 tokens of a frame with
2-D RoPE, causal temporal attention per token position with 1-D RoPE computed for any frame index, QK-norm), with
the flow time as its per-frame adaLN-Zero condition: a frame's t is the same for all its tokens, so it is embedded
once per frame, not once per token. The output projection starts at zero. A DiT with num_actions > 0 also adds to
that condition an embedding of the latent action that led to the frame, or of a learned "no action" (frames whose
action was dropped in training, and the unconditioned half of classifier-free guidance at sampling); with
num_actions = 0 it has no such weights and is the unconditioned DiT.

Training options (both off unless asked; see `forward` and `context_forced`):
  self-forcing (the seed's, --self_forcing_p): with probability p a sample's noise endpoint x_0 is replaced by the
      one the model itself back-projects from a random intermediate point, without gradient:
          x_m   = (1 - m) * x_0 + m * x_1,   m ~ U(0, 1) per frame
          x_0'  = x_m - m * v_theta(x_m, m)          (Euler step from t = m back to t = 0)
      and the loss is ordinary flow matching from x_0' to x_1: target x_1 - x_0' at x_t = (1 - t) x_0' + t x_1.
  context forcing (--context_forcing R): the R frames after a random real prefix are replaced by the model's own
      autoregressive rollout from that prefix (no gradient through it), and the loss is taken on the real frames
      after them only: the model learns to continue from contexts that carry its own errors (exposure bias).

Generation (`Sampler`): context frames are noised once to context_t and their temporal keys/values cached; each
Euler step of a new frame runs the network on that frame's N tokens only. The finished frame is re-noised to
context_t and run once more to join the cache, which keeps the last seq_len - 1 frames. Inside the training length
this equals recomputing the whole window at every step (`cached=False`); past it, a frame keeps the keys it got when
it joined rather than being re-encoded without the frames that slid out (a rolling cache, as in streaming LLMs).
"""
import math
import random
from dataclasses import dataclass, field

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from transformer import STTransformer
from utils import box_weights


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
    num_actions: int = 0      # actions a frame is conditioned on; 0: none (the unconditioned DiT)
    action_dropout: float = 0.1  # training: share of frames whose action becomes the learned "no action"
    lam_clip_len: int = 4     # frames per clip the LAM labelled the training actions in; generation labels alike
    actions: str = "latent"   # what the actions are: "latent", a LAM's (lam/ beside dit/); "true", the game's own
    action_names: list = field(default_factory=list)  # with true actions, the game's name of each (its store's)
    game: str = ""            # with true actions, the store's source, e.g. procgen:coinrun
    residual: bool = False    # predict the clean frame as the previous one + the output (module docstring)
    # The latent patches where the player sits, [top, left, bottom, right] (train_dit.py copies the VAE's focus), whose
    # error weighs focus_weight times the rest's, as the Genie dynamics' focus.
    focus: list = field(default_factory=list)
    focus_weight: float = 1.0


PRESETS = {
    "tiny": DiTConfig(seq_len=12, dim=64, depth=2, heads=4, residual=True),
    "small": DiTConfig(dim=384, depth=6, heads=6, residual=True),
    "default": DiTConfig(residual=True),
}


def check_vae(config, vae_config):
    """The DiT's latent grid must be the VAE's: ValueError otherwise."""
    expected = (vae_config.tokens, vae_config.latent_dim)
    if (config.rows * config.cols, config.latent_dim) != expected:
        raise ValueError(f"the VAE makes latents of shape {expected}, the DiT takes "
                        f"({config.rows * config.cols}, {config.latent_dim}): train them on the same VAE")


def check_lam(config, lam_config):
    """The LAM must read the DiT's latents and have its number of actions: ValueError otherwise."""
    takes = (lam_config.rows * lam_config.cols, lam_config.latent_dim) if lam_config.input == "latents" else "pixels"
    if takes != (config.rows * config.cols, config.latent_dim) or lam_config.num_actions != config.num_actions:
        raise ValueError(f"the LAM takes {takes} with {lam_config.num_actions} actions, the DiT latents of shape "
                         f"({config.rows * config.cols}, {config.latent_dim}) with {config.num_actions} actions: put "
                         f"the LAM the DiT was trained with (train_dit.py --lam) in lam/")


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
        # one embedding per latent action and a last one for "no action" (action dropout, unconditioned sampling)
        self.action_embed = nn.Embedding(config.num_actions + 1, config.dim) if config.num_actions else None
        if self.action_embed is not None:
            nn.init.normal_(self.action_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        nn.init.zeros_(self.out.weight)  # the model starts by predicting zero velocity
        nn.init.zeros_(self.out.bias)
        self.register_buffer("patch_weight", box_weights(config.rows, config.cols, config.focus, config.focus_weight,
                                                         "patches").flatten(), persistent=False)  # (N,)

    def velocity(self, x, t, cache=None, actions=None, previous=None):
        """x (B, T, N, C) at flow times t (B, T) -> predicted velocity (B, T, N, C). actions (B, T) int64: the latent
        action that led to each frame (num_actions: none; None: none for every frame), for a model that takes them.
        previous (B, T, N, C): the clean frame before each frame (zeros before the first), for a residual model
        (None: zeros). With a cache (transformer.KVCache), T = 1: the frame after the cached ones."""
        cond = self.time_embed(timestep_embedding(t, 256))  # (B, T, D): once per frame
        if self.action_embed is not None:
            cond = cond + self.action_embed(self.no_action(t) if actions is None else actions)
        out = self.out(self.transformer(self.embed(x), cond, cache))
        if not self.config.residual:
            return out
        clean = out if previous is None else previous.to(out.dtype) + out  # x_1'
        return (clean - x) / (1 - t).clamp_min(0.05)[..., None, None].to(out.dtype)

    def no_action(self, like):  # (...) filled with the "no action" index, shaped like `like`
        return torch.full(like.shape, self.config.num_actions, dtype=torch.long, device=like.device)

    def led_to(self, actions):
        """Actions as a store gives them, (B, T) with actions[:, k] taken at frame k, -> the action that led to each
        frame (B, T): frame k + 1's is actions[:, k], frame 0's is "no action"."""
        return torch.cat([self.no_action(actions[:, :1]), actions[:, :-1]], dim=1)

    def forward(self, x1, self_forcing_p=0.0, frame_weight=None, actions=None):
        """Flow-matching loss of clean scaled latents x1 (B, T, N, C) -> (loss, logs). actions (B, T) int64, as a
        store gives them (actions[:, k] taken at frame k), for a model that takes them: each frame is conditioned on
        the one that led to it, replaced by "no action" for a random action_dropout of the frames, so that the same
        model also runs unconditioned (classifier-free guidance). frame_weight (B, T) weighs each frame's error
        (default 1: all frames). See the module docstring for self-forcing."""
        b, t_len = x1.shape[:2]
        if self.action_embed is not None:  # drawn with or without actions: the same seed, the same noise
            dropped = torch.rand(b, t_len, device=x1.device) < self.config.action_dropout
            actions = self.no_action(dropped) if actions is None else \
                torch.where(dropped, self.no_action(dropped), self.led_to(actions))
        x0 = torch.randn_like(x1)
        previous = torch.cat([torch.zeros_like(x1[:, :1]), x1[:, :-1]], dim=1)  # (B, T, N, C), for a residual model
        # The random choices that decide what runs are drawn on the host (Python's RNG, saved in training states):
        # drawn on the GPU, the host would have to wait for them before it could queue the work.
        # Self-forcing's extra pass runs on the chosen clips only: p b of them, rounded down or up at random so that
        # each clip is chosen with probability p, and that pass's batch has one of two sizes for a compiled network.
        chosen = int(self_forcing_p * b + random.random()) if self_forcing_p > 0 else 0  # floor or ceil of p b
        if chosen:
            pick = torch.tensor(sorted(random.sample(range(b), chosen))).to(x1.device, non_blocking=True)  # (K,)
            with torch.no_grad():
                x0_k, x1_k = x0[pick], x1[pick]
                m = torch.rand(chosen, t_len, device=x1.device)
                mid = (1 - m[..., None, None]) * x0_k + m[..., None, None] * x1_k
                back = mid - m[..., None, None] * self.velocity(
                    mid, m, actions=None if actions is None else actions[pick], previous=previous[pick]).to(x1.dtype)
            x0 = x0.index_copy(0, pick, back)
        t = torch.rand(b, t_len, device=x1.device)
        xt = (1 - t[..., None, None]) * x0 + t[..., None, None] * x1
        v = self.velocity(xt, t, actions=actions, previous=previous).float()
        if self.config.residual:  # the error of x_1' = x_t + (1 - t) v: the clean frame the model predicts
            error = (xt.float() + (1 - t).clamp_min(0.05)[..., None, None] * v - x1.float()).pow(2)
        else:
            error = (v - (x1 - x0).float()).pow(2)  # (B, T, N, C)
        error = (error.mean(3) * self.patch_weight).mean(2) if self.config.focus else error.mean(dim=(2, 3))  # (B, T)
        frame_weight = x1.new_ones(b, t_len) if frame_weight is None else frame_weight
        loss = (error * frame_weight).sum() / frame_weight.sum()
        return loss, {"flow": loss.detach()}


def context_forced(sampler, x1, frames, actions=None):
    """Context forcing: the `frames` frames of each clip x1 (B, T, N, C) after a random real prefix are replaced by
    the sampler's rollout from that prefix (no gradient through it; under the clip's own actions (B, T), as a store
    gives them, when the model takes actions) -> (x1, frame_weight (B, T)), the weight 0 on the model's own frames, so
    that the loss is taken on the real frames after them."""
    b, t_len = x1.shape[:2]
    prefix = random.randrange(1, t_len - frames)  # on the host, as the choices of DiT.forward
    if actions is not None and sampler.model.action_embed is not None:
        actions = sampler.model.led_to(actions)[:, :prefix + frames]
    else:
        actions = None
    generated = sampler.rollout(x1[:, :prefix], frames, actions=actions)
    x1 = torch.cat([x1[:, :prefix], generated.to(x1.dtype), x1[:, prefix + frames:]], dim=1)
    frame_weight = x1.new_ones(b, t_len)
    frame_weight[:, prefix:prefix + frames] = 0
    return x1, frame_weight


class Sampler:
    """Autoregressive generation with a DiT: generate.py, evaluate.py, bench.py and context forcing use it.

    Each new frame starts as noise at t = 0 and is integrated with `steps` Euler steps while the context is held at
    context_t; it then joins the context. With `cached` (the default) the context's temporal keys/values live in a
    transformer.KVCache, so each Euler step runs only the new frame's N tokens; the finished frame is re-noised to
    context_t and run once more to join the cache (when the next frame is asked for), which keeps the last
    seq_len - 1 frames. The cache is made by the first start() and emptied in place by later ones of the same batch
    size, so every continuation runs on the same tensors, as a CUDA graph of the step needs. With cached=False every
    Euler step recomputes the whole window (the reference the cache is tested against).

    A model that takes actions is given, for every frame, the latent action that led to it (num_actions: none).
    With cfg_scale s != 1, classifier-free guidance: every call of the network runs two copies of the batch in one
    pass, the same context in both, the new frame led to by its action in the first and by "no action" in the
    second, and v = v_none + s * (v_action - v_none). One pass, not two: a compiled step (a CUDA graph) may overwrite
    its previous call's outputs, so the first branch's velocity must not be read after a second call.
    """

    def __init__(self, model, steps=10, context_t=0.95, cached=True, cfg_scale=1.0):
        self.model, self.steps, self.context_t, self.cached, self.cfg_scale = model, steps, context_t, cached, cfg_scale
        self.copies = 2 if cfg_scale != 1 and model.config.num_actions > 0 else 1  # guided: with and without action
        self.window = model.config.seq_len - 1
        self.cache = self.past = self.past_actions = self.last = self.last_action = self.generator = None
        self.previous = None  # the last clean frame (B, 1, N, C): a residual model's x_prev for the next one
        self.holder = None  # of the worlds sharing this sampler, the one whose context it holds (play.World)

    def noise(self, like):
        return torch.randn(like.shape, device=like.device, generator=self.generator, dtype=like.dtype)

    def times(self, value, frames):  # (B, frames) filled with the flow time `value`
        return torch.full((self.past.shape[0], frames), value, device=self.past.device)

    def both(self, x):  # (B, ...) -> (copies * B, ...): the same tensor for each copy of the batch
        return x if self.copies == 1 else torch.cat([x] * self.copies)

    def join(self, frames, actions):
        """Clean frames (B, F, N, C), led to by actions (B, F), join the context at context_t (and the cache, one
        frame at a time)."""
        noised = (1 - self.context_t) * self.noise(frames) + self.context_t * frames
        self.past = noised if self.past is None else torch.cat([self.past, noised], dim=1)[:, -self.window:]
        self.past_actions = actions if self.past_actions is None else \
            torch.cat([self.past_actions, actions], dim=1)[:, -self.window:]
        for i in range(noised.shape[1] if self.cached else 0):
            # a copy with a step's strides, whatever the number of frames (a slice's stride along B is F times a
            # step's, and .contiguous() keeps it at B = 1), so one compiled step serves both without recompiling
            frame = self.both(noised[:, i:i + 1]).clone(memory_format=torch.contiguous_format)
            self.model.velocity(frame, self.both(self.times(self.context_t, 1)), self.cache,
                                self.both(actions[:, i:i + 1]).contiguous())
            self.cache.commit()

    def no_action(self, frames):  # (B, frames): "no action" (also for a model that takes none: it ignores them)
        return torch.full((self.past.shape[0], frames), self.model.config.num_actions, device=self.past.device)

    @torch.no_grad()
    def start(self, context, generator=None, actions=None):
        """Begin a continuation of the clean scaled latents context (B, P, N, C), led to by actions (B, P) (None: no
        action), its noise drawn from `generator` (the global RNG when None). Returns the sampler."""
        self.generator, self.past, self.past_actions, self.last = generator, None, None, None
        context = context[:, -self.window:]
        if actions is None:
            actions = torch.full(context.shape[:2], self.model.config.num_actions, device=context.device)
        if self.cached:
            self.cache = self.model.transformer.new_cache(self.copies * len(context), self.window, context.device,
                                                          reuse=self.cache)
        self.join(context, actions[:, -context.shape[1]:])
        self.previous = context[:, -1:].clone(memory_format=torch.contiguous_format)  # a frame's strides (join)
        return self

    def velocity(self, x, t, action):
        """The new frame's velocity (B, 1, N, C) at flow time t, led to by action (B, 1), guided when cfg_scale != 1."""
        if self.copies == 2:
            action = torch.cat([action, self.no_action(1)])
        if self.cached:
            v = self.model.velocity(self.both(x), self.both(self.times(t, 1)), self.cache, action,
                                    self.both(self.previous))
        else:
            t = torch.cat([self.times(self.context_t, self.past.shape[1]), self.times(t, 1)], dim=1)
            previous = torch.cat([torch.zeros_like(self.past), self.previous], dim=1)  # only the new frame's is used
            actions = torch.cat([self.both(self.past_actions), action], dim=1)
            v = self.model.velocity(self.both(torch.cat([self.past, x], dim=1)), self.both(t), actions=actions,
                                    previous=self.both(previous))[:, -1:]
        if self.copies == 2:
            v_action, v_none = v.chunk(2)
            v = v_none + self.cfg_scale * (v_action - v_none)
        return v

    @torch.no_grad()
    def next_frame(self, action=None):
        """The next frame's clean scaled latents (B, 1, N, C), led to by action (B,) int64 (None: no action)."""
        if self.last is not None:
            self.join(self.last, self.last_action)
        x = self.noise(self.past[:, :1])  # (B, 1, N, C) at t = 0
        none = self.no_action(1)
        action = none if action is None else action.reshape(-1, 1).to(none)
        for k in range(self.steps):
            x = x + self.velocity(x, k / self.steps, action).to(x.dtype) / self.steps
        self.last, self.last_action, self.previous = x, action, x
        return x

    @torch.no_grad()
    def rollout(self, context, num_frames, generator=None, actions=None):
        """Continue context (B, P, N, C) by num_frames frames -> (B, num_frames, N, C). actions (B, P + num_frames):
        the action that led to each frame, the context's then the new ones' (None: no action)."""
        self.start(context, generator, None if actions is None else actions[:, :context.shape[1]])
        new = [None if actions is None else actions[:, context.shape[1] + i] for i in range(num_frames)]
        return torch.cat([self.next_frame(action) for action in new], dim=1)
