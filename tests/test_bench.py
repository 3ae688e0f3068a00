"""bench.py train and play: every model's training step is timed and its FLOPs counted, and the Genie world plays."""
import json

import pytest

from conftest import run


@pytest.mark.parametrize("model", ["dit", "vae2", "tokenizer", "lam", "dynamics"])
def test_bench_train_reports_speed_and_flops(model, tmp_path):
    result = run("bench.py", "train", "--model", model, "--preset", "tiny", "--batch_size", 2, "--steps", 1,
                 "--warmup", 1, "--runs", 1, "--peak_tflops", 1, "--json", tmp_path / "train.json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "train.json").read_text())
    assert figures["model"] == model and figures["device"] == "cpu" and figures["batch_size"] == 2
    assert figures["step_ms"] > 0 and figures["tokens_per_s"] > figures["samples_per_s"] > 0
    assert figures["flops_per_step"] > 6 * figures["params"]  # at least 6 FLOPs per parameter and sample
    assert figures["mfu"] == pytest.approx(figures["achieved_tflops"] / 1)


def test_attention_flops_are_counted_on_cpu():
    """torch counts its CUDA attention kernels only; bench.py adds the CPU one, so CPU and GPU counts agree."""
    import torch
    import torch.nn.functional as F

    import bench
    q = torch.randn(2, 4, 100, 16)  # (B, H, L, K)
    with bench.flop_counter.FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 100 * 100 * 16)  # Q K^T and A V, 2 FLOPs per multiply-add


def test_bench_play_reports_steps_per_second(tmp_path):
    result = run("bench.py", "play", "--preset", "tiny", "--steps", 2, "--warmup", 1, "--runs", 1, "--compile",
                 "--json", tmp_path / "play.json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "play.json").read_text())
    assert figures["steps_per_s"] > 0 and figures["maskgit_steps"] == 8 and figures["compile"]
