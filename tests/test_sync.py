"""A training step never makes the host wait for the device. Under FakeTensorMode tensors have shapes and no values,
so every operation that would need a value on the host (.item(), .tolist(), `if tensor:`, a boolean mask, bincount,
nonzero: on a GPU each one waits for all queued work) raises. step.train_step, the step train_loop runs, must go
through for every model with the options the training scripts use."""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import bench
import dit
import lam
import vae
from step import make_optimizer, train_step, update_ema

CPU = torch.device("cpu")


def the_scripts_loss(name):
    """loss_fn(net, batch, step) as the training script calls the model (batch: bench.training_inputs)."""
    if name == "dit":  # self-forcing on every clip and context forcing: the extra passes of train_dit.py
        def loss_fn(net, batch, step):
            x1, frame_weight = dit.context_forced(dit.Sampler(net, steps=2), batch["latents"], 2)
            return net(x1, self_forcing_p=1.0, frame_weight=frame_weight)
        return loss_fn
    if name == "dynamics":  # tokens and actions from the frozen tokenizer and LAM, as train_genie.py makes them
        tokenizer, action_model = vae.Tokenizer(vae.PRESETS["tiny"]), lam.LatentActionModel(lam.PRESETS["tiny"])

        def loss_fn(net, batch, step):
            tokens = batch["tokens"]
            frames = torch.rand(*tokens.shape[:2], 3, 64, 64) * 2 - 1
            with torch.no_grad():
                tokens = tokenizer.encode(frames.flatten(0, 1)).view(tokens.shape)
                actions = action_model.infer_actions(frames)
            return net(tokens, actions)
        return loss_fn
    return bench.forward


@pytest.mark.parametrize("name", ["vae2", "dit", "tokenizer", "lam", "dynamics"])
def test_a_training_step_needs_no_value_from_the_device(name):
    with FakeTensorMode(allow_non_fake_inputs=True):
        model, batch, _ = bench.training_inputs(name, "tiny", 2, CPU)
        model.train()
        ema = dit.DiT(model.config) if name == "dit" else None
        optimizer = make_optimizer(model, 1e-3, fused=True)  # as on CUDA
        loss, grad_norm, logs, flags = train_step(model, model, optimizer, the_scripts_loss(name), batch, 1, CPU,
                                                  ema=ema, ema_decay=0.999, poisoned=True)
    assert loss.shape == grad_norm.shape == () and flags.shape == (2,)
    assert all(torch.is_tensor(v) for v in logs.values())


def test_the_check_catches_a_host_read():  # the test above could not fail if fake tensors answered .item()
    def loss_read_on_the_host(net, batch, step):
        loss, logs = bench.forward(net, batch, step)
        return loss, {**logs, "loss": loss.item()}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model, batch, _ = bench.training_inputs("tokenizer", "tiny", 2, CPU)
        with pytest.raises(DataDependentOutputException):
            train_step(model, model, make_optimizer(model, 1e-3, fused=True), loss_read_on_the_host, batch, 1, CPU)


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_changes_nothing(fused):
    """The skip itself, with real values: on CUDA's path the fused AdamW skips on its found_inf flag, on CPU's the
    host skips; either way weights, AdamW state and EMA stay as they were, and the next good step moves them."""
    torch.manual_seed(0)
    model, batch, _ = bench.training_inputs("tokenizer", "tiny", 2, CPU)
    ema = vae.Tokenizer(model.config)
    update_ema(ema, model, 1.0)
    optimizer = make_optimizer(model, 1e-3, fused=fused)
    loss_fn = the_scripts_loss("tokenizer")
    train_step(model, model, optimizer, loss_fn, batch, 1, CPU, ema=ema, ema_decay=0.9)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, ema)]
    steps = [s["step"].clone() for s in optimizer.state.values()]
    _, _, _, flags = train_step(model, model, optimizer, loss_fn, batch, 2, CPU, ema=ema, ema_decay=0.9,
                                poisoned=True)
    assert flags.tolist() == [1.0, 0.0]
    for m, saved in zip((model, ema), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, saved[k]), k
    assert [s["step"] for s in optimizer.state.values()] == steps
    train_step(model, model, optimizer, loss_fn, batch, 3, CPU, ema=ema, ema_decay=0.9)
    assert all(not torch.equal(v, before[0][k]) for k, v in model.state_dict().items() if k.endswith("weight"))
