"""MaskGIT dynamics model of the Genie pipeline: predicts the next frame's tokens from the context and a latent action.

Legend: B batch, T frames, N = rows * cols tokens per frame (16 x 16), D model dim, V codebook size.

The model sees the full token grid of every context frame (a pooled summary would lose where things are) through the
spatio-temporal transformer of transformer.py. Frame t is conditioned (adaLN, per frame) on the latent action a_{t-1}
that led to it; frame 0 gets a learned "no action" embedding, and so does a random `action_dropout` of the other frames
in training, so that the model also predicts without the action and the sampler can guide by it (below).

Training (MaskGIT): each frame after the first has its own masking ratio, cos(pi/2 * u) with u ~ U(0, 1); its masked
tokens are replaced by a [MASK] token and predicted with cross-entropy. The first frame is never masked: it is the
context every clip starts from. Causal attention in time lets one clip train every transition at once.

Sampling (`Sampler`): the next frame starts fully masked and is decoded in `steps` parallel steps: sample all masked tokens
(temperature), keep the most confident, re-mask the rest so that cos(pi/2 * s / steps) of the frame stays masked after
step s. The context's temporal keys/values are cached (transformer.KVCache), so each step runs only the new frame's
N tokens; the finished frame is pushed through once more to join the cache, which slides over `context` frames.

Guidance. Greedy decoding of a weak model copies: each token's most likely value is the one it had a frame earlier
(about half of the tokens change between two near-identical frames, each to one of many codes), and the latent action
only moves probability among the other codes, so the argmax never sees it (README: the rollout keeps about 98 % of the
prompt's tokens with the inferred actions and with random ones alike). Classifier-free guidance, logits_none +
cfg_scale * (logits_action - logits_none), lifts the codes that the action makes more likely above the copy.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from transformer import STTransformer
from utils import box_weights


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
    action_dropout: float = 0.1  # training: share of frames whose action becomes "no action" (for guidance)
    actions: str = "latent"  # what the actions are: "latent", the LAM's (lam/ beside dynamics/); "true", the game's own
    action_names: list = field(default_factory=list)  # with true actions, the game's name of each (its store's)
    game: str = ""           # with true actions, the store's source, e.g. procgen:coinrun
    # The tokens where the player sits, [top, left, bottom, right] (train_genie.py copies the tokenizer's focus), whose
    # loss weighs focus_weight times the rest's: a key shows in a few of the agent's tokens among 256, and the plain
    # loss spends the small model on the background (CoinRun: docs/results.md).
    focus: list = field(default_factory=list)
    focus_weight: float = 1.0


CFG_SCALE = 2.0  # the sampler's default guidance of the action; 1 = none (docs/results.md: Genie guidance tables)

PRESETS = {
    "tiny": DynamicsConfig(context=4, dim=64, depth=2, heads=2, focus_weight=20.0),
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
        # Where a token is, absolutely: the spatial RoPE tells only offsets, and CoinRun's camera keeps the agent at one
        # place of the grid, where a key's effect shows.
        self.position = nn.Parameter(torch.zeros(config.rows * config.cols, config.dim))
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        # At unit scale: the action reaches the network only through adaLN modulations that start at zero, so a small
        # embedding gets almost no gradient (at std 0.02 a planted action was not learned in the demo's 300 steps).
        nn.init.normal_(self.action_embed.weight, std=1.0)
        self.register_buffer("token_weight", box_weights(config.rows, config.cols, config.focus, config.focus_weight,
                                                         "tokens").flatten(), persistent=False)  # (N,)

    def frame_conditions(self, actions):
        """Latent actions of the transitions (B, T - 1) -> per-frame conditions (B, T, D), "no action" first."""
        first = actions.new_full((actions.shape[0], 1), self.no_action)
        return self.action_embed(torch.cat([first, actions], dim=1))

    def hidden(self, tokens, cond, cache=None):
        """tokens (B, T, N) with [MASK] where unknown -> features (B, T, N, D). With a cache, T = 1."""
        return self.transformer(self.token_embed(tokens) + self.position, cond, cache)

    def forward(self, tokens, actions):
        """tokens (B, T, rows, cols) from the tokenizer, actions (B, T - 1) from the LAM -> (loss, logs)."""
        b, t = tokens.shape[:2]
        target = tokens.flatten(2)  # (B, T, N)
        ratio = torch.cos(math.pi / 2 * torch.rand(b, t, 1, device=tokens.device))
        ratio[:, 0] = 0  # the first frame is the given context
        mask = torch.rand(target.shape, device=tokens.device) < ratio  # (B, T, N)
        dropped = torch.rand(actions.shape, device=actions.device) < self.config.action_dropout  # (B, T - 1)
        actions = actions.masked_fill(dropped, self.no_action)
        hidden = self.hidden(target.masked_fill(mask, self.mask_token), self.frame_conditions(actions))
        # The first frame has nothing masked, so nothing to predict: the head and the loss skip it (at the tiny preset's
        # context of 4 that is a quarter of the head's logits, the largest tensors of the step).
        logits, target, mask = self.head(hidden[:, 1:]), target[:, 1:], mask[:, 1:]  # (B, T - 1, N, V)
        # Means over the masked tokens as weighted sums: indexing with the mask would give a shape only the GPU knows.
        weight = mask.float() / mask.sum().clamp_min(1)  # (B, T - 1, N)
        ce = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view_as(weight)
        loss = (ce * weight).sum()  # logged unweighted, so that runs with and without a focus compare
        accuracy = ((logits.argmax(-1) == target).float() * weight).sum()
        logs = {"ce": loss.detach(), "acc": accuracy.detach()}
        if self.config.focus:
            focused = mask * self.token_weight
            loss = (ce * focused).sum() / focused.sum().clamp_min(1e-6)
        return loss, logs


def maskgit_decode(logits_fn, batch, n, mask_token, steps, temperature, generator, device):
    """MaskGIT's parallel decoding of one frame of n tokens, batched: logits_fn (B, 1, n) tokens with [MASK] where
    unknown -> (B, n, V) logits. Returns the tokens (B, n)."""
    tokens = torch.full((batch, n), mask_token, dtype=torch.long, device=device)
    for s in range(steps):
        logits = logits_fn(tokens[:, None]).float()  # (B, N, V)
        masked = tokens == mask_token
        if temperature > 0:
            u = torch.rand(logits.shape, device=device, generator=generator).clamp_(1e-20, 1)
            sampled = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max sampling
            chosen = logits.gather(-1, sampled[..., None])[..., 0]
        else:
            chosen, sampled = logits.max(-1)
        confidence = chosen - torch.logsumexp(logits, dim=-1)  # the log-probability of the sampled token
        if temperature > 0:  # MaskGIT's annealed noise on the confidence: more exploration in early steps
            u = torch.rand(confidence.shape, device=device, generator=generator).clamp_(1e-20, 1)
            confidence = confidence - temperature * (1 - (s + 1) / steps) * torch.log(-torch.log(u))
        tokens = torch.where(masked, sampled, tokens)
        confidence = confidence.masked_fill(~masked, float("inf"))  # tokens fixed earlier stay fixed
        still_masked = math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps))
        if still_masked > 0:
            remask = confidence.topk(still_masked, dim=-1, largest=False).indices
            tokens = tokens.scatter(-1, remask, mask_token)
    return tokens


class Sampler:
    """The next frames of a Dynamics model, one latent action at a time: play.py, evaluate.py and bench.py use it.

    start() takes the context frames; each step(action) decodes the next frame by MaskGIT in `steps` parallel steps
    at `temperature` (0: greedy), and the frame joins the context, a window of the last context - 1 frames. With
    `cached` (the default) the context's temporal keys/values live in a transformer.KVCache, so each decoding step
    runs only the new frame's N tokens, and the finished frame is pushed through once more to join the cache. The
    cache is made by the first start() and emptied in place by later ones of the same batch size, so every rollout,
    reset and undo runs on the same tensors, as a CUDA graph of the step needs. With cached=False every decoding step
    recomputes the whole window (the reference the cache is tested against). With cfg_scale s != 1 each decoding
    step runs the new frame twice, with its action and with "no action", on the same cache (module docstring).
    """

    def __init__(self, model, steps=8, temperature=1.0, cached=True, cfg_scale=CFG_SCALE):
        self.model, self.steps, self.temperature, self.cached = model, steps, temperature, cached
        self.cfg_scale = cfg_scale
        self.window = model.config.context - 1
        self.cache = self.context = self.conditions = None
        self.holder = None  # of the worlds sharing this sampler, the one whose context it holds (play.World)

    @torch.no_grad()
    def start(self, tokens, actions=None):
        """Begin from context frames: tokens (B, T, rows, cols), actions (B, T - 1) between them (default 0).
        Returns the sampler."""
        model = self.model
        b, t = tokens.shape[:2]
        actions = tokens.new_zeros(b, t - 1) if actions is None else actions
        tokens = tokens.flatten(2)  # (B, T, N)
        # each frame's condition: the action that led to it, "no action" for the first
        conditions = torch.cat([actions.new_full((b, 1), model.no_action), actions], dim=1)  # (B, T)
        self.context, self.conditions = tokens[:, -self.window:], conditions[:, -self.window:]
        if self.cached:
            self.cache = model.transformer.new_cache(b, self.window, tokens.device, reuse=self.cache)
            cond = model.action_embed(conditions)
            for i in range(t):  # all of them, so that each frame's keys saw the frames before it
                # copies with a step's strides, whatever the context's length (a slice's stride along B is T times a
                # step's, and .contiguous() keeps it at B = 1), so one compiled step serves all without recompiling
                model.hidden(*(x[:, i:i + 1].clone(memory_format=torch.contiguous_format) for x in (tokens, cond)),
                             self.cache)
                self.cache.commit()
        return self

    @torch.no_grad()
    def step(self, action, generator=None):
        """Decode the next frame, given the action (B,) leading to it; it joins the context. -> tokens (B, rows, cols)."""
        model, c = self.model, self.model.config
        if self.cached:
            def logits_given(new, action):  # new (B, 1, N), action (B,)
                return model.head(model.hidden(new, model.action_embed(action)[:, None], self.cache))[:, 0]
        else:
            def logits_given(new, action):
                cond = model.action_embed(torch.cat([self.conditions, action[:, None]], dim=1))
                return model.head(model.hidden(torch.cat([self.context, new], dim=1), cond))[:, -1]

        def logits(new):
            given = logits_given(new, action)
            if self.cfg_scale == 1:
                return given
            none = logits_given(new, torch.full_like(action, model.no_action))
            return torch.lerp(none, given, self.cfg_scale)  # none + cfg_scale * (given - none), in one pass
        tokens = maskgit_decode(logits, len(action), c.rows * c.cols, model.mask_token, self.steps, self.temperature,
                                generator, action.device)
        if self.cached:
            model.hidden(tokens[:, None], model.action_embed(action)[:, None], self.cache)
            self.cache.commit()
        self.context = torch.cat([self.context, tokens[:, None]], dim=1)[:, -self.window:]
        self.conditions = torch.cat([self.conditions, action[:, None]], dim=1)[:, -self.window:]
        return tokens.view(-1, c.rows, c.cols)
