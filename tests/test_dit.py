"""The DiT: shapes, causality in time, cached generation equal to recomputing the window, and overfitting real
latents (CoinRun frames rendered at 320x180, encoded by a tiny ViT-VAE trained in the session fixture)."""
import dataclasses

import pytest
import torch

from dataset import LatentStore, WindowDataset
from dit import PRESETS, DiT, Sampler, context_forced


def random_dit(seq_len=8, seed=0, **changes):
    """A tiny DiT whose zero-initialised parts (adaLN gates, output) are made non-zero, so that every path matters."""
    torch.manual_seed(seed)
    model = DiT(dataclasses.replace(PRESETS["tiny"], seq_len=seq_len, **changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_shapes_and_parameter_counts():
    model = random_dit()
    x, t = torch.randn(2, 5, 220, 48), torch.rand(2, 5)
    assert model.velocity(x, t).shape == (2, 5, 220, 48)
    loss, logs = model(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # the default config is the seed's size class (~255M) without its per-token FiLM MLP
    default = sum(p.numel() for p in DiT(PRESETS["default"]).parameters())
    assert 245e6 < default < 265e6, default


def test_causal_in_time():
    model = random_dit()
    x, t = torch.randn(1, 6, 220, 48), torch.rand(1, 6)
    changed, later_t = x.clone(), t.clone()
    changed[:, 4:] += torch.randn_like(changed[:, 4:])
    later_t[:, 4:] = 0.5
    before, after = model.velocity(x, t), model.velocity(changed, later_t)
    torch.testing.assert_close(before[:, :4], after[:, :4], rtol=0, atol=1e-5)
    assert (before[:, 4:] - after[:, 4:]).abs().max() > 1e-2


@pytest.mark.parametrize("context_frames, new_frames", [(3, 4), (7, 1), (1, 7)])
def test_cached_generation_equals_recomputing_the_window(context_frames, new_frames):
    """Inside the training length the cache changes nothing but speed: the same noise gives the same frames."""
    model = random_dit(seq_len=8)
    context = torch.randn(2, context_frames, 220, 48)
    frames = {}
    for cached in (True, False):
        generator = torch.Generator().manual_seed(3)
        sampler = Sampler(model, steps=3, context_t=0.9, cached=cached)
        frames[cached] = sampler.rollout(context, new_frames, generator)
    assert frames[True].shape == (2, new_frames, 220, 48)
    assert frames[True].abs().mean() > 0.1
    torch.testing.assert_close(frames[True], frames[False], rtol=0, atol=1e-4)


def test_sliding_window_runs_past_the_training_length():
    model = random_dit(seq_len=4)
    frames = Sampler(model, steps=2).rollout(torch.randn(1, 3, 220, 48), 6)
    assert frames.shape == (1, 6, 220, 48) and torch.isfinite(frames).all()


@torch.no_grad()
def test_a_sampler_reuses_its_cache_and_restarts_cleanly():
    """A second start() empties the same cache in place (the addresses a CUDA graph holds) and gives what a fresh
    sampler gives: nothing of the first continuation leaks into the second."""
    model = random_dit(seq_len=6)
    first, second = torch.randn(2, 4, 220, 48), torch.randn(2, 2, 220, 48)
    sampler = Sampler(model, steps=2)
    sampler.rollout(first, 7, torch.Generator().manual_seed(0))  # past the window: the ring wrapped
    keys = sampler.cache.keys[0].data_ptr()
    again = sampler.rollout(second, 3, torch.Generator().manual_seed(1))
    assert sampler.cache.keys[0].data_ptr() == keys
    fresh = Sampler(model, steps=2).rollout(second, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_a_residual_dit_starts_by_copying_the_frame_before():
    model = DiT(dataclasses.replace(PRESETS["tiny"], seq_len=6)).eval()  # as built: the output layer is zero
    assert model.config.residual
    context = torch.randn(2, 3, 220, 48)
    for steps in (1, 4):
        frames = Sampler(model, steps=steps).rollout(context, 2, torch.Generator().manual_seed(0))
        torch.testing.assert_close(frames, context[:, -1:].expand_as(frames))
    # trained, it predicts the clean frame from the one before: a clip that repeats one frame has no loss to learn
    still = context[:, :1].expand(2, 6, 220, 48)
    loss, _ = model(still)
    assert loss > 0  # the first frame has no frame before it
    weight = torch.ones(2, 6)
    weight[:, 0] = 0
    loss, _ = model(still, frame_weight=weight)
    assert loss < 1e-10


def test_training_options_give_gradients():
    model = random_dit()
    model.train()
    x = torch.randn(2, 8, 220, 48)
    for context_forcing in (False, True):
        model.zero_grad()
        x1, frame_weight = context_forced(Sampler(model, steps=2), x, 2) if context_forcing else (x, None)
        loss, _ = model(x1, self_forcing_p=0.0 if context_forcing else 1.0, frame_weight=frame_weight)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters())


def test_the_focus_weighs_the_error_of_its_patches():
    """With the same weights, noise and flow times, the loss's gradient on each predicted velocity is focus_weight
    times larger inside the focus than outside it, and with no focus every patch weighs the same."""
    x = torch.randn(2, 3, 220, 48)
    grads = []
    for focus in ([], [4, 6, 8, 14]):
        torch.manual_seed(0)
        model = DiT(dataclasses.replace(PRESETS["tiny"], focus=focus, focus_weight=20.0))
        velocity = {}
        model.out.register_forward_hook(lambda module, inputs, output: velocity.update(out=output))
        torch.manual_seed(1)
        loss, _ = model(x)
        grads.append(torch.autograd.grad(loss, velocity["out"])[0].abs().sum(dim=(0, 1, 3)).view(11, 20))  # (rows, cols)
    ratio = grads[1] / grads[0]
    inside = torch.zeros(11, 20, dtype=torch.bool)
    inside[4:8, 6:14] = True
    torch.testing.assert_close(ratio[inside] / ratio[~inside].mean(), torch.full((32,), 20.0))
    torch.testing.assert_close(ratio[~inside], ratio[~inside].mean().expand(188))


def test_overfits_real_latents(diffusion_data):
    """One real clip of latents, 100 Adam steps: the flow-matching loss falls by more than 3x (measured FACTOR)."""
    store = LatentStore(diffusion_data["latents"])
    clip = WindowDataset(store, 4)[0]
    x1 = clip["mu"][None].float() * store.scale  # (1, 4, 220, 48), unit variance
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(PRESETS["tiny"], seq_len=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def mean_loss(repeats=20):
        with torch.no_grad():
            return sum(model(x1.expand(2, -1, -1, -1))[0].item() for _ in range(repeats)) / repeats

    first = mean_loss()
    for _ in range(100):
        loss, _ = model(x1.expand(2, -1, -1, -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = mean_loss()
    print(f"flow-matching loss {first:.3f} -> {last:.3f} ({first / last:.1f}x)")
    assert last < first / 3, (first, last)


def test_latent_actions_steer_the_frame_and_no_action_is_the_unconditioned_path():
    model = random_dit(num_actions=4)
    context = torch.randn(1, 3, 220, 48)
    frames = [Sampler(model, steps=3).rollout(context, 2, torch.Generator().manual_seed(0),
                                             actions=torch.tensor([[4, 0, 1, a, a]])) for a in (1, 2, 2)]
    assert (frames[0] - frames[1]).abs().mean() > 1e-3  # same noise, another action: another frame
    torch.testing.assert_close(frames[1], frames[2], rtol=0, atol=0)
    x, t = torch.randn(2, 5, 220, 48), torch.rand(2, 5)
    torch.testing.assert_close(model.velocity(x, t), model.velocity(x, t, actions=torch.full((2, 5), 4)), rtol=0, atol=0)
    # a DiT without actions is the one trained before actions existed: same weights, so its folders still load
    assert not any(k.startswith("action_embed") for k in DiT(PRESETS["tiny"]).state_dict())


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_generation_with_actions_equals_recomputing_the_window(cfg_scale):
    model = random_dit(seq_len=6, num_actions=4)
    context, actions = torch.randn(2, 2, 220, 48), torch.randint(4, (2, 6))  # inside the training length
    frames = [Sampler(model, steps=3, context_t=0.9, cached=cached, cfg_scale=cfg_scale).rollout(
        context, 4, torch.Generator().manual_seed(3), actions=actions) for cached in (True, False)]
    torch.testing.assert_close(frames[0], frames[1], rtol=0, atol=1e-4)


@torch.no_grad()
def test_guided_generation_runs_one_batched_pass_per_euler_step_equal_to_two_calls():
    model = random_dit(seq_len=6, num_actions=4)
    context, actions = torch.randn(2, 2, 220, 48), torch.randint(4, (2, 5))
    steps, scale, context_t, frames = 3, 2.5, 0.9, 3
    passes = []
    hook = model.transformer.register_forward_hook(lambda *_: passes.append(1))
    sampler = Sampler(model, steps=steps, context_t=context_t, cfg_scale=scale)
    batched = sampler.rollout(context, frames, torch.Generator().manual_seed(3), actions=actions)
    hook.remove()
    # one pass per context frame joining the cache, per Euler step, and per generated frame joining it but the last
    assert len(passes) == 2 + frames * steps + frames - 1, len(passes)

    # the reference: two calls per Euler step on the whole window, with the sampler's order of noise draws
    generator, none = torch.Generator().manual_seed(3), torch.full((2, 1), 4)
    noised = lambda x: (1 - context_t) * torch.randn(x.shape, generator=generator) + context_t * x
    past, past_actions = noised(context), actions[:, :2]  # (B, P + frames): each frame's action, as rollout takes
    previous, made = context[:, -1:], []
    for i in range(frames):
        if i:
            past, past_actions = torch.cat([past, noised(made[-1])], dim=1), torch.cat([past_actions, action], dim=1)
        x, action = torch.randn((2, 1, 220, 48), generator=generator), actions[:, 2 + i:3 + i]
        for k in range(steps):
            t = torch.cat([torch.full(past.shape[:2], context_t), torch.full((2, 1), k / steps)], dim=1)
            window = torch.cat([past, x], dim=1)
            before = torch.cat([torch.zeros_like(past), previous], dim=1)
            v_action, v_none = (model.velocity(window, t, actions=torch.cat([past_actions, a], dim=1),
                                               previous=before)[:, -1:] for a in (action, none))
            x = x + (v_none + scale * (v_action - v_none)) / steps
        made.append(x)
        previous = x
    torch.testing.assert_close(batched, torch.cat(made, dim=1), rtol=0, atol=1e-4)


def test_training_with_actions_and_action_dropout():
    model = random_dit(num_actions=4).train()
    x1, actions = torch.randn(2, 5, 220, 48), torch.randint(4, (2, 5))
    loss, _ = model(x1, actions=actions)
    loss.backward()
    assert model.action_embed.weight.grad[:4].abs().sum() > 0
    # every action dropped: the unconditioned path, whatever the actions were
    model.config.action_dropout = 1.0
    losses = []
    for given in (actions, None):
        torch.manual_seed(1)
        losses.append(model(x1, actions=given)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
