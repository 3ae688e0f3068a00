"""MaskGIT dynamics: shapes, causality, action dropout and guidance, cached decoding equal to recomputing the whole
context, and an action effect planted in synthetic tokens learned in a short run."""
import dataclasses
import re

import pytest
import torch

from dynamics import PRESETS, Dynamics, DynamicsConfig, Sampler
from step import make_optimizer, train_step


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Dynamics(PRESETS["tiny"]).eval()
    for p in model.transformer.parameters():  # leave adaLN-Zero's zero init, so the test sees real attention
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_loss_shapes_and_gradient():
    model = Dynamics(PRESETS["tiny"])
    tokens = torch.randint(0, 1024, (2, 4, 16, 16))
    loss, logs = model(tokens, torch.randint(0, 8, (2, 3)))
    loss.backward()
    assert loss.item() > 6  # about ln(1024) at initialisation
    assert model.token_embed.weight.grad.abs().sum() > 0
    # adaLN-Zero: the action embedding gets no gradient until the zero-initialised modulation has moved; it does get one.
    assert model.transformer.blocks[0].modulation.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_later_frames_do_not_change_earlier_logits():
    model = tiny_model()
    tokens = torch.randint(0, 1024, (1, 4, 256))
    actions = torch.randint(0, 8, (1, 3))
    out = model.head(model.hidden(tokens, model.frame_conditions(actions)))
    tokens[:, 3] = torch.randint(0, 1024, (1, 256))
    actions[:, 2] = (actions[:, 2] + 1) % 8
    out2 = model.head(model.hidden(tokens, model.frame_conditions(actions)))
    assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-5) and not torch.allclose(out[:, 3], out2[:, 3])


def test_the_focus_weighs_the_loss_of_its_tokens_and_the_logged_loss_stays_plain():
    tokens, actions = torch.randint(0, 1024, (2, 4, 16, 16)), torch.randint(0, 8, (2, 3))
    logged = []
    for focus in ([], [7, 5, 11, 11]):
        torch.manual_seed(0)
        model = Dynamics(dataclasses.replace(PRESETS["tiny"], focus=focus, focus_weight=20.0))
        logits = {}
        model.head.register_forward_hook(lambda module, inputs, output: logits.update(out=output))
        torch.manual_seed(1)  # the same masks and dropped actions for both
        loss, logs = model(tokens, actions)
        logged.append(logs["ce"])
        # Each masked token's gradient on its logits, over that of the plain sum of cross-entropies: its weight.
        ce = torch.nn.functional.cross_entropy(logits["out"].flatten(0, 2), tokens[:, 1:].flatten(), reduction="none")
        weighted, plain = (torch.autograd.grad(x, logits["out"])[0].norm(dim=-1) for x in (loss, ce.sum()))
        weight = (weighted / plain).view(2, 3, 16, 16)
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[7:11, 5:11] = bool(focus)
        masked = weight > 0
        if focus:
            torch.testing.assert_close(weight[masked & inside].mean() / weight[masked & ~inside].mean(),
                                       torch.tensor(20.0))
        else:
            torch.testing.assert_close(loss, logs["ce"])
            assert weight[masked].std() < 1e-4
    torch.testing.assert_close(logged[0], logged[1])  # the logged loss is the plain one, with or without a focus
    with pytest.raises(ValueError, match=re.escape("focus takes [top, left, bottom, right], tokens")):
        Dynamics(dataclasses.replace(PRESETS["tiny"], focus=[7, 5, 17, 11]))


def test_dropped_actions_train_the_no_action_path():
    model = Dynamics(PRESETS["tiny"])
    model.config.action_dropout = 1.0
    tokens = torch.randint(0, 1024, (2, 4, 16, 16))
    losses = []
    for actions in (torch.randint(0, 8, (2, 3)), torch.full((2, 3), model.no_action)):
        torch.manual_seed(1)
        losses.append(model(tokens, actions)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


@torch.no_grad()
def test_guidance_decodes_the_guided_logits_and_scale_1_is_the_plain_model():
    model = tiny_model()
    context, action = torch.randint(0, 1024, (2, 2, 16, 16)), torch.tensor([3, 5])
    known = torch.tensor([[1], [6]])  # the action between the two context frames
    x = torch.cat([context.flatten(2), torch.full((2, 1, 256), model.mask_token)], dim=1)

    def logits(new_action):
        return model.head(model.hidden(x, model.frame_conditions(torch.cat([known, new_action[:, None]], 1))))[:, -1]
    given, none = logits(action), logits(torch.full_like(action, model.no_action))
    for scale, expected in ((1.0, given), (3.0, none + 3 * (given - none))):
        tokens = Sampler(model, steps=1, temperature=0, cfg_scale=scale).start(context, known).step(action)
        assert torch.equal(tokens.flatten(1), expected.argmax(-1))
    assert not torch.equal((none + 3 * (given - none)).argmax(-1), given.argmax(-1))  # the test can tell them apart


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@torch.no_grad()
def test_cached_decoding_equals_uncached(cfg_scale):
    model = tiny_model()
    context = torch.randint(0, 1024, (3, 1, 16, 16))  # batch of 3 worlds, one prompt frame each
    cached, uncached = Sampler(model, steps=4, temperature=0, cfg_scale=cfg_scale).start(context), \
        Sampler(model, steps=4, temperature=0, cached=False, cfg_scale=cfg_scale).start(context)
    for _ in range(2):  # the context window is 4 frames: 1 prompt + 2 predicted + the one being decoded
        action = torch.randint(0, 8, (3,))
        assert torch.equal(cached.step(action), uncached.step(action))
    # Sampling at temperature > 0 with the same generator is also identical.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cached = Sampler(model, steps=8, cfg_scale=cfg_scale).start(context)
    uncached = Sampler(model, steps=8, cached=False, cfg_scale=cfg_scale).start(context)
    action = torch.tensor([1, 2, 3])
    tokens = cached.step(action, g1)
    assert torch.equal(tokens, uncached.step(action, g2))
    assert (tokens != model.mask_token).all()


@torch.no_grad()
def test_a_restarted_sampler_reuses_its_cache_and_forgets_the_last_rollout():
    model = tiny_model()
    sampler = Sampler(model, steps=4, temperature=0).start(torch.randint(0, 1024, (2, 1, 16, 16)))
    for action in (1, 4, 6, 2, 0):  # past the window: the ring wraps
        sampler.step(torch.full((2,), action))
    keys = sampler.cache.keys[0].data_ptr()
    context, actions = torch.randint(0, 1024, (2, 2, 16, 16)), torch.tensor([[3], [5]])
    fresh = Sampler(model, steps=4, temperature=0)
    for world in (sampler, fresh):
        world.start(context, actions)
    for action in (2, 7):
        assert torch.equal(sampler.step(torch.full((2,), action)), fresh.step(torch.full((2,), action)))
    assert sampler.cache.keys[0].data_ptr() == keys


def planted_clips(batch, generator, actions=8, vocab=32, side=8):
    """Clips (B, 4, side, side) where each next frame copies the last one but for token (side // 2, side // 2), set to
    the action that led to it, and one other token redrawn -> (tokens, actions (B, 3))."""
    tokens = torch.randint(0, vocab, (batch, 4, side, side), generator=generator)
    taken = torch.randint(0, actions, (batch, 3), generator=generator)
    for t in range(1, 4):
        tokens[:, t] = tokens[:, t - 1]
        tokens[:, t, side // 2, side // 2] = taken[:, t - 1]
        noise = torch.randint(0, side * side, (batch,), generator=generator)
        tokens[:, t].view(batch, -1)[torch.arange(batch), noise] = torch.randint(0, vocab, (batch,), generator=generator)
    return tokens, taken


def test_a_planted_action_is_learned_in_a_short_run():
    # The action reaches the network only through adaLN modulations that start at zero, and the spatial RoPE tells a
    # token only offsets: with the action embedding at std 0.02 and no absolute position, 11-13 % after these steps.
    torch.manual_seed(0)
    config = DynamicsConfig(vocab_size=32, rows=8, cols=8, num_actions=8, context=4, dim=32, depth=2, heads=2)
    model = Dynamics(config)
    optimizer = make_optimizer(model, 1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(100):  # the trainers' step: clipping, the non-finite guard
        tokens, taken = planted_clips(16, generator)
        train_step(model, model, optimizer, lambda net, batch, _: net(batch["tokens"], batch["actions"]),
                   {"tokens": tokens, "actions": taken}, step, torch.device("cpu"))
    tokens, taken = planted_clips(256, torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        predicted = Sampler(model, steps=1, temperature=0, cfg_scale=1).start(tokens[:, :3], taken[:, :2]).step(
            taken[:, 2]).view(-1, 8, 8)
    assert (predicted[:, 4, 4] == taken[:, 2]).float().mean() > 0.9  # chance 1/8
