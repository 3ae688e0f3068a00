"""The diffusion pipeline end to end through its command lines: train_dit.py on a frame store (encoded once with the
VAE and cached), generate.py from a real mp4, evaluate.py dit, bench.py generate, and the user mistakes."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_user_error, read_video, run, write_video
from dataset import FrameStore, LatentStore
from dit import PRESETS, DiT
from utils import load_model, save_model


@pytest.fixture(scope="module")
def world(diffusion_data, tmp_path_factory):
    """models/{vae2,dit} as a user has them after train_vae.py and train_dit.py, and a 12 fps mp4 to prompt with."""
    root = tmp_path_factory.mktemp("diffusion")
    shutil.copytree(diffusion_data["vae"], root / "models" / "vae2")
    store = FrameStore(diffusion_data["store"])
    # DATA is the frame store itself: train_dit.py finds (or makes) its latents with this VAE
    result = run(ROOT / "train_dit.py", diffusion_data["store"], "--vae", root / "models" / "vae2", "--out",
                 root / "models" / "dit", "--preset", "tiny", "--seq_len", 6, "--steps", 12, "--batch_size", 2,
                 "--num_workers", 0, "--log_every", 6, "--sample_every", 12, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    write_video(root / "prompt.mp4", np.array(store.frames[:40]), 12)
    return root


def test_train_dit_writes_a_model_that_reloads_with_no_flags(world, diffusion_data):
    model = load_model(DiT, world / "models" / "dit")
    assert model.config.seq_len == 6
    # the latent scale travels with the model, from the latents it was trained on
    latents = LatentStore(diffusion_data["store"].parent / f"{diffusion_data['store'].name}_latents")
    assert model.config.latent_scale == pytest.approx(latents.scale)
    again = load_model(DiT, world / "models" / "dit")
    x, t = torch.randn(1, 3, 220, 48), torch.rand(1, 3)
    torch.testing.assert_close(model.velocity(x, t), again.velocity(x, t), rtol=0, atol=0)
    assert json.loads((world / "models" / "logs" / "dit.json").read_text())[-1]["step"] == 12
    assert (world / "results" / "dit_sample.mp4").stat().st_size > 0


@pytest.mark.parametrize("side_by_side", [False, True])
def test_generate_writes_a_decodable_video(world, side_by_side):
    output = world / f"generated_{side_by_side}.mp4"
    args = ["generate.py", "--prompt_video", world / "prompt.mp4", "--models", world / "models", "--prompt_frames", 4,
            "--num_frames", 7, "--steps", 2, "--output", output, "--seed", 1]
    result = run(*args, *(["--side_by_side"] if side_by_side else []), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    frames = read_video(output)
    assert frames.shape == (4 + 7, 180, 640 if side_by_side else 320, 3)
    assert output.with_suffix(".gif").stat().st_size > 0
    if side_by_side:  # the left half is the true video, the prompt is shown as it is in both halves
        left, right = frames[..., :320, :].astype(int), frames[..., 320:, :].astype(int)
        assert np.abs(left[:4] - right[:4]).mean() < 3


def test_evaluate_dit_reports_every_horizon_step_next_to_the_baseline(world, diffusion_data, tmp_path):
    result = run("evaluate.py", "dit", diffusion_data["store"], "--models", world / "models", "--clips", 3,
                 "--prompt_frames", 4, "--horizon", 3, "--steps", 2, "--samples", 3, "--json", tmp_path / "dit.json",
                 timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "dit.json").read_text())
    for key in ("psnr", "ssim", "baseline_psnr", "baseline_ssim", "recon_psnr", "best_of_k_psnr", "latent_copy_psnr",
                "baseline_exact"):
        assert len(figures[key]) == 3 and all(np.isfinite(figures[key])), key
    # the best of 3 continuations per clip includes the reported first one, and other noise gives other frames
    best, first = np.array(figures["best_of_k_psnr"]), np.array(figures["psnr"])
    assert (best >= first - 1e-6).all() and (best > first + 1e-3).any()
    assert figures["clips"] == 3 and (tmp_path / "dit.png").stat().st_size > 0
    # copying the true last prompt frame is near-perfect one step ahead in CoinRun; a tiny untrained world is not
    assert figures["baseline_psnr"][0] > figures["psnr"][0]
    # the copied latent carries the VAE's error: below the pixel copy
    assert figures["latent_copy_psnr"][0] < figures["baseline_psnr"][0]


def test_generate_user_errors(world, tmp_path):
    models = world / "models"
    short = write_video(tmp_path / "short.mp4", np.zeros((5, 180, 320, 3), np.uint8), 12)
    assert_user_error(run("generate.py", "--prompt_video", short, "--models", models, "--prompt_frames", 16,
                          "--output", tmp_path / "a.mp4"), "fewer than")
    assert_user_error(run("generate.py", "--prompt_video", short, "--models", tmp_path / "nothing",
                          "--output", tmp_path / "a.mp4"), "does not exist")
    assert_user_error(run("generate.py", "--prompt_video", short, "--models", models, "--steps", 0,
                          "--output", tmp_path / "a.mp4"), "--steps")
    # a DiT made for another VAE's latents
    shutil.copytree(models / "vae2", tmp_path / "mixed" / "vae2")
    save_model(DiT(dataclasses.replace(PRESETS["tiny"], latent_dim=32)), tmp_path / "mixed" / "dit")
    assert_user_error(run("generate.py", "--prompt_video", short, "--models", tmp_path / "mixed", "--prompt_frames", 2,
                          "--output", tmp_path / "a.mp4"), "the VAE makes latents of shape")
    assert not (tmp_path / "a.mp4").exists()


def test_bench_generate_reports_the_speeds(tmp_path):
    result = run("bench.py", "generate", "--preset", "tiny", "--frames", 1, "--runs", 1, "--steps", 2, "--profile",
                 "--json", tmp_path / "bench.json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["preset"] == "tiny" and figures["device"] == "cpu" and figures["params"] > 0
    assert figures["cached_fps"] > 0 and figures["uncached_fps"] > 0 and figures["decoded_fps"] > 0
    assert "aten::_scaled_dot_product" in result.stdout  # --profile's table of the slowest operations
