"""The Genie pipeline end to end at the tiny preset on real CoinRun frames: train, evaluate, play; and bad input."""
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, assert_user_error, run
from dataset import FrameStore, FrameWriter, TokenStore, WindowDataset, action_effect, model_id, write_meta
from dynamics import CFG_SCALE
from evaluate import lam_decoder_errors, lam_decoder_figures, lam_rollout, latent_action_figures, \
    linear_probe
from lam import LAMConfig, LatentActionModel
from play import default_keymap
from train_genie import open_tokens
from utils import from_uint8, load_model, save_model
from vae import Tokenizer

PROCGEN_ACTIONS = ["LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "NOOP", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP", "D", "A",
                   "W", "S", "Q", "E"]  # procgen's 15, as download.py names them


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


@torch.no_grad()
def test_the_token_store_holds_what_the_frozen_models_say_and_is_remade_when_they_change(genie, tmp_path):
    models = genie / "models"
    store, tokens = FrameStore(genie / "coinrun"), TokenStore(models / "tokens")
    tokenizer, action_model = load_model(Tokenizer, models / "tokenizer"), load_model(LatentActionModel, models / "lam")
    assert tokens.count == store.count and tokens.grid == (16, 16)
    picks = [0, 1, 1234, store.count - 1]
    frames = from_uint8(torch.stack([store.window(i, 1)["frames"][0] for i in picks]))
    assert np.array_equal(tokens.tokens[picks], tokenizer.encode(frames).numpy())
    first, end = store.episodes()[1]  # the LAM labels an episode in clips of 4 frames (tiny) overlapping by one
    for start in (first, first + 3):
        clip = from_uint8(store.window(start, 4)["frames"][None])
        assert np.array_equal(tokens.latent_actions[start:start + 3], action_model.infer_actions(clip)[0].numpy())
    item = WindowDataset(tokens, 4)[0]
    assert item["tokens"].shape == (4, 16, 16) and item["latent_actions"].shape == (3,)

    copy = tmp_path / "models"
    for name in ("tokenizer", "lam", "tokens"):
        shutil.copytree(models / name, copy / name)
    written = (copy / "tokens" / "meta.json").stat().st_mtime_ns
    open_tokens(store, copy, 4, torch.device("cpu"))  # the same models: reused
    assert (copy / "tokens" / "meta.json").stat().st_mtime_ns == written
    action_model.vq.codebook.mul_(-1)
    save_model(action_model, copy / "lam")
    again = open_tokens(store, copy, 4, torch.device("cpu"))  # another LAM: made again
    assert again.lam_id == model_id(copy / "lam") != tokens.lam_id and again.tokenizer_id == tokens.tokenizer_id
    assert np.array_equal(again.tokens[picks], tokens.tokens[picks])


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


def test_guidance_is_a_flag_of_play_and_evaluate_and_bad_values_are_refused(genie, tmp_path):
    frames = {}
    for scale in (1, 6):
        out = tmp_path / f"play{scale}"
        result = run("play.py", "--models", genie / "models", "--data", genie / "coinrun", "--actions", "1,4,6",
                     "--cfg_scale", scale, "--output_dir", out)
        assert result.returncode == 0, result.stderr
        frames[scale] = np.stack([cv2.imread(str(p)) for p in sorted(out.glob("frame_*.png"))])
    assert np.array_equal(frames[1][0], frames[6][0]) and not np.array_equal(frames[1], frames[6])
    assert_user_error(run("play.py", "--models", genie / "models", "--cfg_scale", -1, "--actions", "1",
                          "--output_dir", tmp_path / "p"), "--cfg_scale must be at least 0")
    assert_user_error(run("evaluate.py", "genie", genie / "coinrun", "--models", genie / "models", "--cfg_scale", -1,
                          "--json", tmp_path / "e.json"), "--cfg_scale must be at least 0")


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
    assert figures["cfg_scale"] == CFG_SCALE and figures["temperature"] == 0
    for key in ("tokenizer_psnr", "codebook_used", "lam_usage", "lam_codes_used", "lam_perplexity", "nmi",
                "delta_psnr_t4", "delta_psnr_long", "rollout_psnr", "baseline_psnr", "nmi_effect", "effect_accuracy",
                "horizontal_accuracy", "probe_accuracy", "effect_accuracy_chance", "effect_majority",
                "lam_decoder_gain_db", "lam_decoder_vs_copy_db", "lam_rollout_psnr", "lam_random_action_psnr",
                "lam_delta_psnr_t4", "lam_delta_psnr_long", "token_copy_psnr", "baseline_exact"):
        assert key in figures
    assert np.isfinite([figures["lam_decoder_gain_db"], figures["lam_decoder_vs_copy_db"]]).all()
    assert len(figures["rollout_psnr"]) == len(figures["baseline_psnr"]) == len(figures["lam_rollout_psnr"]) == 5
    # the prompt's tokens copied carry the tokenizer's error on top of the pixel copy's
    assert len(figures["token_copy_psnr"]) == 5 and figures["token_copy_psnr"][0] < figures["baseline_psnr"][0]
    assert len(figures["baseline_exact"]) == 5 and all(0 <= share <= 1 for share in figures["baseline_exact"])
    assert figures["lam_delta_psnr_t4"] == figures["lam_rollout_psnr"][3] - figures["lam_random_action_psnr"][3]
    assert abs(sum(figures["lam_usage"]) - 1) < 1e-6 and 0 <= figures["nmi"] <= 1 and 0 <= figures["nmi_effect"] <= 1
    assert figures["effects"] == ["left", "left + jump", "none", "jump", "right", "right + jump"]
    assert (tmp_path / "eval_confusion.png").stat().st_size > 0
    meaning = json.loads((genie / "models" / "meaning.json").read_text())["meaning"]  # for play.py's labels
    assert meaning == figures["meaning"] and len(meaning) == 8
    assert sum(m["count"] for m in meaning) == 16 * 5


def test_plot_draws_the_training_logs(genie, tmp_path):
    logs = [genie / "models" / "logs" / f"{phase}.json" for phase in ("tokenizer", "lam", "dynamics")]
    result = run("evaluate.py", "plot", *logs, "--out", tmp_path / "curves.png")
    assert result.returncode == 0, result.stderr
    image = cv2.imread(str(tmp_path / "curves.png"))
    assert image.shape == (400, 640, 3) and (image != 255).any(axis=2).mean() > 0.01  # axes, labels and 3 curves
    assert_user_error(run("evaluate.py", "plot", logs[0], "--key", "ce", "--out", tmp_path / "x.png"),
                      "logs no 'ce'; it logs step, loss")
    assert_user_error(run("evaluate.py", "plot", genie / "coinrun" / "meta.json", "--out", tmp_path / "x.png"),
                      "is not a training log")


def test_effect_classes_read_from_action_names():
    assert [action_effect(n, "procgen:coinrun")[1] for n in ("LEFT+UP", "RIGHT", "DOWN", "Q", "NOOP", "UP")] == \
        ["left + jump", "right", "none", "none", "none", "jump"]
    assert action_effect("RIGHT+DOWN", "procgen:coinrun") == ("right", "right")
    assert action_effect("UPRIGHTFIRE", "ale:pong") == ("right", "up + right + fire")
    assert action_effect("DOWNLEFT", "ale:freeway") == ("left", "down + left")
    assert action_effect("NOOP", "ale:breakout") == ("none", "none")


def test_lam_decoder_errors_compare_its_actions_with_random_ones_and_a_copy(genie):
    frames = from_uint8(torch.stack([WindowDataset(genie / "coinrun", 5, split="val")[i]["frames"] for i in range(4)]))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    one_action = LatentActionModel(LAMConfig(dim=16, depth=1, heads=1, num_actions=1)).eval()
    trained = load_model(LatentActionModel, genie / "models" / "lam")  # 8 actions, 40 steps: its decoder reads them
    for action_model in (one_action, trained):
        with torch.no_grad():
            actions = action_model.infer_actions(frames)
            inferred, shuffled, copy = lam_decoder_errors(action_model, frames, actions, generator).tolist()
        assert copy == pytest.approx(((frames[:, 1:] - frames[:, :-1]) ** 2).mean().item())
        if action_model is one_action:  # random actions are then the inferred ones: no gain
            assert inferred == shuffled
        else:  # other actions, other predictions
            assert inferred != shuffled
    assert lam_decoder_figures(torch.tensor([1.0, 2.0, 0.5])) == pytest.approx(
        {"lam_decoder_gain_db": 10 * np.log10(2), "lam_decoder_vs_copy_db": 10 * np.log10(0.5)})


def sliding_store(coinrun, out, shuffle_actions, episodes=48, length=15, step=4):
    """A store whose frames show what was done: in each episode a 64x64 view walks `step` px left (action LEFT),
    right (RIGHT) or not at all (NOOP) over a real CoinRun frame upscaled 3x. With shuffle_actions the recorded
    actions are permuted, so that the frames no longer show them."""
    rng = np.random.default_rng(0)
    source = torch.from_numpy(np.array(FrameStore(coinrun).frames)).permute(0, 3, 1, 2).float()
    moves = {PROCGEN_ACTIONS.index("LEFT"): -step, PROCGEN_ACTIONS.index("NOOP"): 0, PROCGEN_ACTIONS.index("RIGHT"): step}
    actions = rng.choice(list(moves), episodes * length)
    out.mkdir()
    writer = FrameWriter(out, episodes * length, 64, 64)
    for e in range(episodes):
        image = torch.nn.functional.interpolate(source[rng.integers(len(source))][None], scale_factor=3)[0]
        offsets = 64 + np.concatenate([[0], np.cumsum([moves[a] for a in actions[e * length:(e + 1) * length - 1]])])
        views = torch.stack([image[:, 64:128, x:x + 64] for x in offsets])  # (length, 3, 64, 64)
        writer.write(range(e * length, (e + 1) * length), views.permute(0, 2, 3, 1).round().byte().numpy())
    writer.close()
    np.save(out / "actions.npy", rng.permutation(actions) if shuffle_actions else actions)
    write_meta(out, source="procgen:coinrun", fps=15.0, height=64, width=64, count=episodes * length,
               episode_starts=list(range(0, episodes * length, length)), levels=list(range(episodes)),
               num_actions=len(PROCGEN_ACTIONS), action_names=PROCGEN_ACTIONS)
    return out


@pytest.mark.parametrize("shuffle_actions, precision", [(False, "bf16"), (True, "auto")])
def test_the_inverse_dynamics_ceiling_reads_actions_the_frames_show_and_no_others(coinrun, tmp_path, shuffle_actions,
                                                                                  precision):
    store = sliding_store(coinrun, tmp_path / "sliding", shuffle_actions)
    result = run("evaluate.py", "idm", store, "--steps", 150, "--batch_size", 32, "--json", tmp_path / "idm.json",
                 "--precision", precision)  # bf16 on the CPU (make demo's) learns as fp32 does
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "idm.json").read_text())
    assert figures["transitions"] > 40
    if shuffle_actions:
        assert figures["effect_accuracy"] < figures["effect_majority"] + 0.2 and figures["nmi_effect"] < 0.2
    else:
        assert figures["effect_accuracy"] > 0.9 and figures["horizontal_accuracy"] > 0.9 and figures["nmi_effect"] > 0.6
        # only the motion shows the action here: one frame, or the pair reversed, reads no better than "none" for all
        none = figures["horizontal_none_share"]
        assert 0.2 < none < 0.5 and figures["horizontal_accuracy_one_frame"] < none + 0.15
        assert figures["horizontal_accuracy_reversed"] < none + 0.15


@torch.no_grad()
def test_the_lam_rollout_feeds_back_its_own_frames(genie):
    frames = from_uint8(torch.stack([WindowDataset(genie / "coinrun", 5, split="val")[i]["frames"] for i in range(3)]))
    torch.manual_seed(0)
    copying = LatentActionModel(LAMConfig(width=16)).eval()  # the conv LAM, untrained: a copy
    assert torch.equal(copying.frames_of(copying.tokens(frames)), frames)
    actions = copying.infer_actions(frames)
    assert torch.allclose(lam_rollout(copying, frames[:, 0], actions), frames[:, :1].expand(-1, 4, -1, -1, -1))
    trained = load_model(LatentActionModel, genie / "models" / "lam")
    generated = lam_rollout(trained, frames[:, 0], actions)
    assert generated.shape == frames[:, 1:].shape and generated.abs().max() <= 1
    first = trained.decode(frames[:, :1], trained.action_embedding(actions[:, :1]))  # step 1 reads the prompt alone
    assert torch.allclose(generated[:, 0], trained.frames_of(first)[:, 0].clamp(-1, 1), atol=1e-5)
    second = trained.decode(torch.stack([frames[:, 0], generated[:, 0]], 1), trained.action_embedding(actions[:, :2]))
    assert torch.allclose(generated[:, 1], trained.frames_of(second)[:, 1].clamp(-1, 1), atol=1e-5)  # not the true frame


def test_the_inverse_dynamics_ceiling_needs_true_actions(coinrun, tmp_path):
    store = sliding_store(coinrun, tmp_path / "sliding", False, episodes=4)
    (store / "actions.npy").unlink()
    assert_user_error(run("evaluate.py", "idm", store, "--json", tmp_path / "idm.json"), "has no true actions")
    assert not (tmp_path / "idm.json").exists()


def test_latent_action_figures_on_planted_latents():
    rng = np.random.default_rng(0)
    true = rng.integers(0, len(PROCGEN_ACTIONS), 6000)
    effects = [action_effect(n, "procgen:coinrun")[1] for n in PROCGEN_ACTIONS]
    classes = list(dict.fromkeys(effects))
    planted = np.array([classes.index(effects[a]) for a in true])  # a LAM whose codes are the effect classes
    figures = latent_action_figures(planted, true, PROCGEN_ACTIONS, "procgen:coinrun", 8, rng)
    assert figures["nmi_effect"] == pytest.approx(1) and figures["effect_accuracy"] == 1
    assert figures["horizontal_accuracy"] == 1 and figures["lam_codes_used"] == 6
    assert [m["effect"] for m in figures["meaning"]] == classes + ["unused", "unused"]
    assert [m["share"] for m in figures["meaning"][:6]] == [1] * 6
    assert figures["nmi_effect_chance"] < 0.01  # the shuffled latents

    shuffled = latent_action_figures(rng.permutation(planted), true, PROCGEN_ACTIONS, "procgen:coinrun", 8, rng)
    assert shuffled["nmi_effect"] < 0.01 and shuffled["nmi"] < 0.01
    assert shuffled["effect_accuracy"] == pytest.approx(shuffled["effect_majority"], abs=0.03)
    none_share = np.mean([action_effect(PROCGEN_ACTIONS[a], "procgen:coinrun")[0] == "none" for a in true])
    assert shuffled["horizontal_accuracy"] == pytest.approx(none_share, abs=0.03)  # everything maps to "none"


def test_linear_probe_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 2000)
    codes = rng.normal(size=(6, 16))[labels] + 0.3 * rng.normal(size=(2000, 16))
    assert linear_probe(codes[:1000], labels[:1000], codes[1000:], labels[1000:], 6) == 1
    noise = rng.normal(size=(2000, 16))
    assert linear_probe(noise[:1000], labels[:1000], noise[1000:], labels[1000:], 6) < 0.25  # chance: 1/6


def test_default_keys_follow_the_meaning():
    meaning = [{"action": 0, "effect": "left + jump", "share": 0.5}, {"action": 1, "effect": "right", "share": 0.4},
               {"action": 2, "effect": "right", "share": 0.7}, {"action": 3, "effect": "right + jump", "share": 0.9}]
    # no action means "left" or "jump" alone: the keys take one that includes it; nothing means "none"
    assert default_keymap(meaning) == {"ArrowLeft": 0, "ArrowRight": 2, "ArrowUp": 3, " ": 3, "ArrowDown": -1}


@pytest.mark.parametrize("actions, message", [("1,9", "got [9]"), ("1,x", "'x' is neither"), ("-1", "got [-1]")])
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
