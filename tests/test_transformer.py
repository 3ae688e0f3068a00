"""Invariants of the shared spatio-temporal transformer: causal in time, and the KV cache changes nothing."""
import torch

from transformer import STTransformer


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
    cache = model.new_cache(batch=2, max_frames=16, device=x.device)
    for t in range(6):
        for _ in range(2):  # a step leaves the cache as it was (a denoising / MaskGIT step): the same output again
            step = model(x[:, t:t + 1], cond[:, t:t + 1], cache)
            torch.testing.assert_close(step, full[:, t:t + 1], rtol=0, atol=1e-5)
        cache.commit()
    assert len(cache) == 6 and cache.position == 6


@torch.no_grad()
def test_ring_of_frames_equals_recomputing_the_window():
    """Past max_frames the oldest slot is overwritten; a new frame attends to exactly the last max_frames frames (and
    itself), wherever they sit in the ring: the same as the whole window through the network, if the cached frames
    saw the same past when they joined. That holds for a model of one block, whose keys depend on the frame alone."""
    torch.manual_seed(0)
    model = STTransformer(dim=32, depth=1, heads=2, rows=3, cols=4).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, cond = torch.randn(2, 11, 12, 32), torch.randn(2, 11, 32)
    cache = model.new_cache(batch=2, max_frames=4, device=x.device)
    for t in range(11):
        step = model(x[:, t:t + 1], cond[:, t:t + 1], cache)
        window = model(x[:, max(0, t - 4):t + 1], cond[:, max(0, t - 4):t + 1])[:, -1:]
        # RoPE is relative: the window recomputed from position 0 and the cache at absolute positions agree
        torch.testing.assert_close(step, window, rtol=0, atol=1e-5)
        cache.commit()
    assert len(cache) == 4 and cache.position == 11 and cache.next_position.item() == 11
