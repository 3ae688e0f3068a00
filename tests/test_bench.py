"""bench.py train, play, memory and prepare: every model's training step is timed and its FLOPs counted, the Genie
world plays, a step's memory is estimated and planned for a card, and prepare is timed next to ffmpeg."""
import json

import pytest

from conftest import assert_user_error, run


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


def test_bench_train_counts_the_recompute_of_activation_checkpointing(tmp_path):
    flops = {}
    for flag in ([], ["--checkpoint_blocks"]):
        result = run("bench.py", "train", "--model", "dit", "--preset", "tiny", "--batch_size", 2, "--steps", 1,
                     "--warmup", 1, "--runs", 1, "--json", tmp_path / "train.json", *flag)
        assert result.returncode == 0, result.stderr[-3000:]
        figures = json.loads((tmp_path / "train.json").read_text())
        flops[bool(flag)] = figures["flops_per_step"]
    # the blocks' forward runs twice: a third more than forward + backward (3 forwards' worth), a little less in all
    assert 1.2 < flops[True] / flops[False] < 1.34


def test_bench_memory_plans_a_card(tmp_path):
    result = run("bench.py", "memory", "--model", "lam", "--preset", "tiny", "--gpu_memory", 0.1, "--json",
                 tmp_path / "memory.json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "memory.json").read_text())
    assert figures["gpu_memory_gb"] == 0.1 and figures["fits"] and figures["peak_gb"] <= 0.095
    assert figures["micro_batch"] == 8 and figures["checkpoint_blocks"] is False  # 16 at once would not fit
    assert figures["peak_gb"] == pytest.approx(sum(figures[f"{k}_gb"] for k in (
        "weights", "gradients", "optimizer", "ema", "activations")))


def test_bench_data_compares_the_loader_with_a_gpu_step(coinrun, tmp_path):
    result = run("bench.py", "data", coinrun, "--model", "lam", "--preset", "tiny", "--steps", 3, "--warmup", 1,
                 "--num_workers", 1, "--json", tmp_path / "data.json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "data.json").read_text())
    assert figures["batch_size"] == 16 and figures["frames_per_sample"] == 4 and figures["loader_samples_per_s"] > 0
    assert figures["gpu_samples_per_s"] == pytest.approx(
        16 / (figures["flops_per_step"] / (989e12 * 0.4)), rel=1e-6)
    assert figures["loader_ratio"] == pytest.approx(figures["loader_samples_per_s"] / figures["gpu_samples_per_s"])
    assert_user_error(run("bench.py", "data", coinrun, "--model", "dit", "--preset", "tiny"),
                      "the dit trains on a latent store")


def test_bench_prepare_times_prepare_next_to_ffmpeg(wide_frames, tmp_path):
    from bench import encode_video
    encode_video(tmp_path / "clip.mp4", wide_frames, (320, 180), 30, audio=True)
    result = run("bench.py", "prepare", tmp_path / "clip.mp4", "--size", "160x90", "--runs", 1,
                 "--json", tmp_path / "prepare.json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "prepare.json").read_text())
    assert figures["frames"] == 30 and figures["source"]["width"] == 320 and figures["source"]["fps"] == 30
    assert figures["prepare_frames_per_s"] > 0 and figures["ffmpeg_frames_per_s"] > 0 and figures["peak_rss_mb"] > 0
    assert figures["ratio"] == pytest.approx(figures["prepare_frames_per_s"] / figures["ffmpeg_frames_per_s"])
    assert not [p for p in tmp_path.iterdir() if p.name != "clip.mp4" and p.name != "prepare.json"]
