"""Invariants of the shared spatio-temporal transformer: causal in time, and the KV cache changes nothing."""
import torch

from transformer import KVCache, STTransformer


def model_and_inputs(t=6, seed=0):
    torch.manual_seed(seed)
    model = STTransformer(dim=32, depth=2, heads=2, rows=3, cols=4).eval()
    for p in model.parameters():  # leave adaLN-Zero's zero init: otherwise every block is the identity
        torch.nn.init.normal_(p, std=0.2)
    return model, torch.randn(2, t, 12, 32), torch.randn(2, t, 32)


@torch.no_grad()
def test_changing_a_later_frame_leaves_earlier_outputs_unchanged():
    model, x, cond = model_and_inputs()
    out = model(x, cond)
    x2, cond2 = x.clone(), cond.clone()
    x2[:, 4:] += torch.randn_like(x2[:, 4:])
    cond2[:, 4:] += 1
    out2 = model(x2, cond2)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6)
    assert not torch.allclose(out[:, 4:], out2[:, 4:], atol=1e-3)


@torch.no_grad()
def test_cached_frame_by_frame_equals_full_sequence():
    model, x, cond = model_and_inputs()
    full = model(x, cond)
    cache = KVCache(max_frames=16)
    model(x[:, :2], cond[:, :2], cache, update_cache=True)  # prefill two frames at once (masked causal path)
    for t in range(2, 6):
        step = model(x[:, t:t + 1], cond[:, t:t + 1], cache)  # read-only, as during denoising / MaskGIT steps
        assert torch.allclose(step, full[:, t:t + 1], atol=1e-5)
        model(x[:, t:t + 1], cond[:, t:t + 1], cache, update_cache=True)
    assert len(cache) == 6 and cache.position == 6


@torch.no_grad()
def test_cache_slides_and_positions_keep_counting():
    model, x, cond = model_and_inputs(t=10)
    cache = KVCache(max_frames=4)
    for t in range(10):
        model(x[:, t:t + 1], cond[:, t:t + 1], cache, update_cache=True)
    assert len(cache) == 4 and cache.position == 10
