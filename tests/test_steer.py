"""The playable diffusion world through its command lines: play.py's batch mode on it, generate.py steered by
--actions, evaluate.py dit's controllability and latent-action figures, and the user mistakes. (The browser and the
web server play it in test_web.py.)"""
import dataclasses
import json
import shutil

import cv2
import numpy as np

from conftest import assert_user_error, read_video, run
from dit import PRESETS as DIT_PRESETS, DiT
from lam import PRESETS as LAM_PRESETS, LatentActionModel
from utils import save_model


def test_play_steps_the_diffusion_world_and_the_action_changes_the_frame(steerable_world, diffusion_data, tmp_path):
    runs = []
    for i, actions in enumerate(("1,1,1", "6,6,6", "1,1,1")):
        out = tmp_path / f"play_{i}"
        result = run("play.py", "--models", steerable_world, "--data", diffusion_data["store"], "--actions", actions,
                     "--steps", 2, "--cfg_scale", 3, "--output_dir", out)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append([cv2.imread(str(p)) for p in sorted(out.glob("frame_*.png"))])
        assert (out / "rollout.gif").stat().st_size > 0 and (out / "rollout.mp4").stat().st_size > 0
    first, other, again = runs
    assert len(first) == 4 and first[0].shape == (180, 320, 3)  # the prompt and 3 steps, at the VAE's size
    assert (first[0] == other[0]).all()  # the same prompt frame
    assert any((a != b).any() for a, b in zip(first[1:], other[1:]))  # same noise, another action: another frame
    assert all((a == b).all() for a, b in zip(first, again))  # same seed and actions: the same frames


def test_generate_follows_the_actions_or_reads_them_from_the_video(steerable_world, diffusion_data, tmp_path):
    args = ["generate.py", "--prompt_video", diffusion_data["store"], "--models", steerable_world, "--prompt_frames", 3,
            "--steps", 2, "--output", tmp_path / "steered.mp4"]
    result = run(*args, "--actions", "2,5,7/1,1,1", "--cfg_scale", 2)  # two continuations of one prompt
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latent actions (--actions): 2,5,7/1,1,1" in result.stdout
    video = read_video(tmp_path / "steered.mp4").astype(int)
    assert video.shape == (3 + 3, 180, 2 * 320, 3)
    assert np.abs(video[:3, :, :320] - video[:3, :, 320:]).mean() < 3  # the same prompt on both sides
    assert_user_error(run(*args, "--actions", "2,5,7/1,1"), "give one per generated frame")
    result = run(*args, "--num_frames", 4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "latent actions (the LAM's reading of the true continuation)" in result.stdout


def test_evaluate_dit_measures_the_latent_actions(steerable_world, diffusion_data, tmp_path):
    models = tmp_path / "models"  # evaluate.py writes meaning.json into the folder: a copy of the shared world
    shutil.copytree(steerable_world, models)
    result = run("evaluate.py", "dit", diffusion_data["store"], "--models", models, "--clips", 3, "--prompt_frames", 3,
                 "--horizon", 4, "--steps", 2, "--json", tmp_path / "eval.json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "eval.json").read_text())
    for key in ("rollout_psnr", "random_action_psnr", "baseline_psnr", "psnr"):
        assert len(figures[key]) == 4 and all(np.isfinite(figures[key])), key
    assert figures["delta_psnr_t4"] == figures["rollout_psnr"][3] - figures["random_action_psnr"][3]
    assert figures["rollout_psnr"] != figures["random_action_psnr"]  # other actions, other frames
    assert 1 <= figures["lam_codes_used"] <= 8 and 0 <= figures["nmi_effect"] <= 1
    assert np.isfinite([figures["lam_decoder_gain_db"], figures["lam_decoder_vs_copy_db"]]).all()
    meaning = json.loads((models / "meaning.json").read_text())["meaning"]  # for play.py's labels
    assert meaning == figures["meaning"] and len(meaning) == 8


def test_steering_user_errors(steerable_world, diffusion_data, tmp_path):
    store, output = diffusion_data["store"], tmp_path / "a.mp4"
    generate = ["generate.py", "--prompt_video", store, "--prompt_frames", 3, "--output", output]
    assert_user_error(run(*generate, "--models", steerable_world, "--actions", "1,8"), "--actions takes comma-separated integers in [0, 8); got [8]")
    assert_user_error(run(*generate, "--models", steerable_world, "--cfg_scale", -1), "--cfg_scale must be")
    assert_user_error(run("evaluate.py", "dit", store, "--models", steerable_world, "--cfg_scale", -1,
                          "--json", tmp_path / "e.json"), "--cfg_scale must be")
    assert_user_error(run("play.py", "--models", steerable_world, "--cfg_scale", "-0.5", "--actions", "1",
                          "--output_dir", tmp_path / "p"), "--cfg_scale must be")
    # a LAM of other latents than the VAE's
    mixed = tmp_path / "mixed"
    for part in ("vae2", "dit"):
        shutil.copytree(steerable_world / part, mixed / part)
    save_model(LatentActionModel(dataclasses.replace(LAM_PRESETS["tiny"], input="latents", latent_dim=32)),
               mixed / "lam")
    assert_user_error(run(*generate, "--models", mixed), "the LAM takes (220, 32)")
    # a DiT trained without latent actions cannot be steered or played
    unsteered = tmp_path / "unsteered"
    shutil.copytree(steerable_world / "vae2", unsteered / "vae2")
    save_model(DiT(DIT_PRESETS["tiny"]), unsteered / "dit")
    assert_user_error(run(*generate, "--models", unsteered, "--actions", "1"), "this DiT takes no actions")
    assert_user_error(run("play.py", "--models", unsteered, "--actions", "1", "--output_dir", tmp_path / "p"),
                      "cannot be played")
    assert not output.exists() and not (tmp_path / "p").exists() and not (tmp_path / "e.json").exists()
