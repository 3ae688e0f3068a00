"""torch.compile changes speed, not results: compiled blocks train like eager ones, and the compiled per-step calls of
generation and play (shapes fixed by the ring KV cache) give the frames of eager ones. CPU inductor, so the CUDA
graphs of mode="reduce-overhead" are not exercised here; one-block models keep the compile time short."""
import dataclasses
import random

import numpy as np
import torch

import dit
import dynamics
import vae
from generate import compile_world
from play import GenieWorld, warm_up
from step import make_optimizer, train_step
from training import compile_blocks
from vae2 import PRESETS as VAE2_PRESETS, ViTVAE


def one_block_dit():
    torch.manual_seed(0)
    model = dit.DiT(dataclasses.replace(dit.PRESETS["tiny"], depth=1, seq_len=6))
    with torch.no_grad():  # leave adaLN-Zero's zero init and every block is the identity
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_compiled_blocks_train_like_eager_ones():
    x = torch.randn(2, 6, 220, 48)
    runs = {}
    for compiled in (False, True):
        model = one_block_dit().train()
        if compiled:
            compile_blocks(model)
        optimizer = make_optimizer(model, 1e-3)
        random.seed(0)
        torch.manual_seed(1)
        rollouts = dit.Sampler(model, steps=2)

        def loss_fn(net, batch, step):  # as train_dit.py with --self_forcing_p 0.5 --context_forcing 2
            x1, frame_weight = dit.context_forced(rollouts, batch["latents"], 2)
            return net(x1, self_forcing_p=0.5, frame_weight=frame_weight)
        losses = [train_step(model, model, optimizer, loss_fn, {"latents": x}, step, torch.device("cpu"))[0]
                  for step in range(3)]
        runs[compiled] = torch.stack(losses), torch.cat([p.detach().flatten() for p in model.parameters()])
    assert model.transformer.blocks[0]._compiled_call_impl is not None  # the block did run compiled
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-3, atol=1e-5)


@torch.no_grad()
def test_compiled_generation_gives_the_eager_frames():
    model = one_block_dit().eval()
    vae2 = ViTVAE(VAE2_PRESETS["tiny"]).eval()
    context = torch.randn(1, 3, 220, 48)
    frames = {}
    for compiled in (False, True):
        if compiled:
            compile_world(vae2, model, torch.device("cpu"))
        sampler = dit.Sampler(model, steps=3)  # 8 frames, past the window of 5: the ring wraps
        latents = sampler.rollout(context, 8, generator=torch.Generator().manual_seed(2))
        frames[compiled] = latents, vae2.decode(latents[0])
    torch.testing.assert_close(frames[True][0], frames[False][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(frames[True][1], frames[False][1], rtol=0, atol=1e-4)


@torch.no_grad()
def test_compiled_play_gives_the_eager_frames():
    torch.manual_seed(0)
    tokenizer = vae.Tokenizer(vae.PRESETS["tiny"]).eval()
    config = dataclasses.replace(dynamics.PRESETS["tiny"], depth=1, vocab_size=tokenizer.config.num_codes,
                                 rows=tokenizer.config.grid, cols=tokenizer.config.grid)
    model = dynamics.Dynamics(config).eval()
    for p in model.transformer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    prompt = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    frames = {}
    for compiled in (False, True):
        # unguided: guidance s multiplies the compiled kernels' float rounding by s, enough to flip a near-tie token
        # of this random model, and MaskGIT decodes the rest of the frame from it (measured: 32 % of one frame's
        # pixels on one 2-core machine, none on another); at 1 the frames are the eager ones
        world = GenieWorld(tokenizer, model, maskgit_steps=4, temperature=0, cfg_scale=1)
        if compiled:
            world.compile()
        shown = [world.reset(prompt)] + [world.step([a]) for a in (1, 5, 2, 7, 0)]  # 5 steps: the ring of 3 wraps
        shown.append(world.undo())
        frames[compiled] = np.stack(shown)
    assert (np.abs(frames[True].astype(int) - frames[False]) > 1).mean() < 0.01


def compiled_graphs():
    """Frames dynamo has compiled so far in this process (each a graph, or a recompile of one)."""
    return torch._dynamo.utils.counters["frames"]["ok"]


def cache_addresses(cache):
    return [(t.data_ptr(), t.stride()) for t in [*cache.keys, *cache.values, cache.visible, cache.next_position]]


@torch.no_grad()
def test_play_sessions_resets_and_undo_replay_one_cache_and_compile_nothing_new():
    """What CUDA graphs need of play.py: after the warm-up (play.warm_up: a reset, a step, an undo), two browser
    sessions stepping in turn, resets, undos and a walk past the window run on the same cache tensors (addresses and
    strides) and compile nothing new."""
    torch.manual_seed(0)
    tokenizer = vae.Tokenizer(vae.PRESETS["tiny"]).eval()
    config = dataclasses.replace(dynamics.PRESETS["tiny"], depth=1, vocab_size=tokenizer.config.num_codes,
                                 rows=tokenizer.config.grid, cols=tokenizer.config.grid)
    world = GenieWorld(tokenizer, dynamics.Dynamics(config).eval(), maskgit_steps=2)
    world.compile()
    warm_up(world)
    cache, graphs = world.sampler.cache, compiled_graphs()
    addresses = cache_addresses(cache)
    prompts = np.random.default_rng(0).integers(0, 256, (2, 1, 64, 64, 3), dtype=np.uint8)
    first, second = world.spawn(1), world.spawn(2)
    first.reset(prompts[0])
    second.reset(prompts[1])
    for action in (1, 2, 3, 4, 5):  # turns: each session starts the shared sampler again from its own frames
        first.step([action])
        second.step([7 - action])
    first.undo()
    second.reset(prompts[0])
    second.step([0])
    assert first.sampler.cache is second.sampler.cache is cache and cache_addresses(cache) == addresses
    assert compiled_graphs() == graphs


@torch.no_grad()
def test_a_generation_stream_and_context_forcing_training_compile_nothing_new():
    model = one_block_dit().eval()
    vae2 = ViTVAE(VAE2_PRESETS["tiny"]).eval()
    compile_world(vae2, model, torch.device("cpu"))
    sampler = dit.Sampler(model, steps=2)
    sampler.rollout(torch.randn(1, 3, 220, 48), 2)  # the warm-up: prefill, steps, a commit
    cache, graphs = sampler.cache, compiled_graphs()
    addresses = cache_addresses(cache)
    for prompt_frames in (5, 2):  # a new prompt of another length, then a stream past the window of 5
        sampler.rollout(torch.randn(1, prompt_frames, 220, 48), 7)
    assert sampler.cache is cache and cache_addresses(cache) == addresses
    assert compiled_graphs() == graphs

    model = one_block_dit().train()
    compile_blocks(model)
    optimizer = make_optimizer(model, 1e-3)
    rollouts = dit.Sampler(model, steps=2)

    def loss_fn(net, batch, step):  # train_dit.py with --context_forcing 2
        x1, frame_weight = dit.context_forced(rollouts, batch["latents"], 2)
        return net(x1, self_forcing_p=0.5, frame_weight=frame_weight)
    with torch.enable_grad():
        steps = [train_step(model, model, optimizer, loss_fn, {"latents": torch.randn(2, 6, 220, 48)}, step,
                            torch.device("cpu")) for step in range(5)]
        cache, graphs = rollouts.cache, compiled_graphs()
        addresses = cache_addresses(cache)
        steps += [train_step(model, model, optimizer, loss_fn, {"latents": torch.randn(2, 6, 220, 48)}, step,
                             torch.device("cpu")) for step in range(5, 10)]
    assert rollouts.cache is cache and cache_addresses(cache) == addresses
    assert compiled_graphs() == graphs
