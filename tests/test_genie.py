"""The Genie pipeline end to end at the tiny preset on real CoinRun frames: train, evaluate, play; and bad input."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, assert_user_error, run


def test_every_phase_learns(genie):
    logs = {p: json.loads((genie / "models" / "logs" / f"{p}.json").read_text()) for p in ("tokenizer", "lam", "dynamics")}
    for phase, history in logs.items():
        first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-3:]])
        assert last < first, (phase, first, last)
    assert logs["tokenizer"][-1]["recon"] < logs["tokenizer"][0]["recon"] / 1.5
    assert logs["dynamics"][-1]["ce"] < logs["dynamics"][0]["ce"] - 0.3  # from ~ln(1024) = 6.9
    assert len(logs["lam"][-1]["code_usage"]) == 8
    for phase in logs:
        assert sorted(p.name for p in (genie / "models" / phase).iterdir()) == ["config.json", "model.safetensors"]


def test_play_batch_writes_every_frame(genie, tmp_path):
    result = run("play.py", "--models", genie / "models", "--data", genie / "coinrun", "--actions", "0,1,2,3,4,5,6,7,3,3",
                 "--use_dataset_frame", "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("frame_*.png"))) == 11  # the prompt and one frame per action
    assert (tmp_path / "rollout.gif").stat().st_size > 0 and (tmp_path / "rollout.mp4").stat().st_size > 0


def test_play_compiled_gives_the_eager_frames(genie, tmp_path):
    frames = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flags else "eager")
        result = run("play.py", "--models", genie / "models", "--data", genie / "coinrun", "--actions", "1,4,4,6,2",
                     "--temperature", 0, "--output_dir", out, *flags)
        assert result.returncode == 0, result.stderr
        frames[bool(flags)] = np.stack([cv2.imread(str(p)) for p in sorted(out.glob("frame_*.png"))])
    assert frames[True].shape == (6, 256, 256, 3)
    assert (np.abs(frames[True].astype(int) - frames[False]) > 1).mean() < 0.01


def test_play_terminal_reads_keys(genie, tmp_path):
    result = subprocess.run([sys.executable, "play.py", "--models", str(genie / "models"), "--data",
                             str(genie / "coinrun"), "--output_dir", str(tmp_path), "--ui", "terminal"],
                            input="12r3x9q", text=True, capture_output=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("action") == 3 and "reset" in result.stdout  # x and 9 (out of range) are ignored
    assert (tmp_path / "current.png").exists() and (tmp_path / "step_0002.png").exists()


def test_evaluate_genie_writes_the_figures(genie, tmp_path):
    out = tmp_path / "eval.json"
    result = run("evaluate.py", "genie", genie / "coinrun", "--models", genie / "models", "--clips", 16,
                 "--horizon", 5, "--json", out)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    for key in ("tokenizer_psnr", "codebook_used", "lam_usage", "lam_codes_used", "lam_perplexity", "nmi",
                "delta_psnr_t4", "delta_psnr_long", "rollout_psnr", "baseline_psnr"):
        assert key in figures
    assert len(figures["rollout_psnr"]) == len(figures["baseline_psnr"]) == 5
    assert abs(sum(figures["lam_usage"]) - 1) < 1e-6 and 0 <= figures["nmi"] <= 1
    assert (tmp_path / "eval_confusion.png").stat().st_size > 0


@pytest.mark.parametrize("actions, message", [("1,9", "got [9]"), ("1,x", "not '1,x'"), ("-1", "got [-1]")])
def test_play_refuses_bad_actions(genie, tmp_path, actions, message):
    result = run("play.py", "--models", genie / "models", "--data", genie / "coinrun", "--actions", actions,
                 "--output_dir", tmp_path / "out")
    assert_user_error(result, message)
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path):
    assert_user_error(run("play.py", "--models", tmp_path / "nothing", "--actions", "1"), "does not exist")
    assert_user_error(run("evaluate.py", "genie", tmp_path, "--models", tmp_path / "nothing"), "does not exist")
    assert_user_error(run("train_genie.py", "--phase", "dynamics", "--data", tmp_path / "nothing", "--out", tmp_path),
                      "not a frame store")
