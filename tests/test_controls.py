"""Worlds on the game's own controls: the Genie dynamics and the DiT trained on a store's true actions
(--actions true), played and generated with the game's action names, and the following figure that reads off a
world's frames, with an inverse dynamics model trained on real ones, whether it does what it is told."""
import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from conftest import assert_user_error, run
from dataset import FrameStore
from dit import DiT, Sampler
from dynamics import Dynamics
from evaluate import (IDMConfig, InverseDynamics, following_ceiling_figures, following_figures, held_clips, idm_folder,
                      keys_from_labels)
from test_genie import PROCGEN_ACTIONS, sliding_store
from utils import from_uint8, load_model


def test_the_model_folders_record_the_game_and_its_actions(true_genie, true_dit):
    for model in (load_model(Dynamics, true_genie / "dynamics"), load_model(DiT, true_dit / "dit")):
        c = model.config
        assert (c.actions, c.action_names, c.game, c.num_actions) == ("true", PROCGEN_ACTIONS, "procgen:coinrun", 15)
    # the tokens of the tokenizer's focus, weighed by the preset's focus_weight
    assert load_model(Dynamics, true_genie / "dynamics").config.focus == [7, 5, 11, 11]


@torch.no_grad()
def test_two_actions_from_the_same_prompt_and_noise_give_different_frames(true_genie, true_dit, diffusion_data):
    dynamics = load_model(Dynamics, true_genie / "dynamics")
    tokens = torch.randint(0, dynamics.config.vocab_size, (1, 2, 16, 16))
    left, right = (torch.tensor([[PROCGEN_ACTIONS.index(name)]]) for name in ("LEFT", "RIGHT"))
    logits = [dynamics.head(dynamics.hidden(tokens.flatten(2), dynamics.frame_conditions(a))) for a in (left, right)]
    assert not torch.allclose(logits[0][:, 1], logits[1][:, 1])  # the next frame's prediction
    torch.testing.assert_close(logits[0][:, 0], logits[1][:, 0])  # the first frame is not led to by either
    model = load_model(DiT, true_dit / "dit")
    context = torch.randn(1, 2, 220, 48)
    frames = [Sampler(model, steps=2).rollout(context, 2, torch.Generator().manual_seed(0),
                                              actions=torch.cat([torch.full((1, 2), 4), a.expand(1, 2)], dim=1))
              for a in (left, right)]
    assert not torch.allclose(frames[0], frames[1])


def test_the_dropped_action_is_the_unconditioned_model(true_genie, true_dit):
    tokens, actions = torch.randint(0, 1024, (2, 4, 16, 16)), torch.randint(0, 15, (2, 3))
    dynamics = load_model(Dynamics, true_genie / "dynamics")
    dynamics.config.action_dropout = 1.0
    losses = []
    for given in (actions, torch.full_like(actions, dynamics.no_action)):
        torch.manual_seed(0)
        losses.append(dynamics(tokens, given)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    model = load_model(DiT, true_dit / "dit")
    model.config.action_dropout = 1.0
    x1, actions = torch.randn(2, 4, 220, 48), torch.randint(0, 15, (2, 4))
    losses = []
    for given in (actions, None):
        torch.manual_seed(0)
        losses.append(model(x1, actions=given)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def test_the_worlds_take_the_games_action_names(true_genie, true_dit, genie, diffusion_data, tmp_path):
    result = run("play.py", "--models", true_genie, "--data", genie / "coinrun", "--actions", "RIGHT,right,LEFT+UP,3",
                 "--use_dataset_frame", "--output_dir", tmp_path / "genie")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "genie").glob("frame_*.png"))) == 5
    result = run("generate.py", "--prompt_video", diffusion_data["store"], "--models", true_dit, "--prompt_frames", 3,
                 "--steps", 2, "--actions", "RIGHT,RIGHT/left,noop", "--output", tmp_path / "dit.mp4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "true actions (--actions): RIGHT,RIGHT/LEFT,NOOP" in result.stdout
    # without --actions the prompt's own continuation leads: its recorded actions
    result = run("generate.py", "--prompt_video", diffusion_data["store"], "--models", true_dit, "--prompt_frames", 3,
                 "--num_frames", 2, "--steps", 2, "--side_by_side", "--output", tmp_path / "truth.mp4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "true actions (the true continuation's)" in result.stdout


def test_a_world_trained_on_true_actions_is_evaluated_against_random_ones(true_genie, true_dit, genie, diffusion_data,
                                                                         tmp_path):
    result = run("evaluate.py", "genie", genie / "coinrun", "--models", true_genie, "--clips", 8, "--horizon", 4,
                 "--json", tmp_path / "genie.json", "--idm", tmp_path / "no_idm")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "genie.json").read_text())
    assert figures["actions"] == "true" and len(figures["rollout_psnr"]) == 4
    assert figures["delta_psnr_t4"] == pytest.approx(figures["rollout_psnr"][3] - figures["random_action_psnr"][3])
    assert figures["cfg_scale"] != 1 and figures["delta_psnr_t4_unguided"] == pytest.approx(
        figures["rollout_psnr_unguided"][3] - figures["random_action_psnr_unguided"][3])
    assert figures["rollout_psnr_unguided"] != figures["rollout_psnr"]  # the guidance changes the frames
    ce = figures["next_frame_ce"]
    assert all(0 < ce[k] < 20 for k in ("recorded", "random", "none")) and 0 < figures["tokens_changed"] < 1
    assert figures["action_information"] == pytest.approx(ce["random"] - ce["recorded"])
    assert "no following figure: no inverse dynamics model" in result.stdout
    result = run("evaluate.py", "idm", diffusion_data["store"], "--steps", 5, "--batch_size", 8, "--transitions", 16,
                 "--json", tmp_path / "idm.json", "--out", tmp_path / "idm")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("evaluate.py", "dit", diffusion_data["store"], "--models", true_dit, "--clips", 2, "--horizon", 2,
                 "--prompt_frames", 3, "--steps", 2, "--json", tmp_path / "dit.json", "--idm", tmp_path / "idm")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "dit.json").read_text())
    assert figures["actions"] == "true" and "random_action_psnr" in figures and "lam_usage" not in figures
    assert 0 <= figures["following_accuracy"] <= 1 and set(figures["following_by_class"]) == {"left", "none", "right"}
    assert 0 <= figures["following_ceiling_decoded"] <= 1  # the held clips through the ViT-VAE
    assert figures["class_actions"] == {"0": 1, "1": 4, "2": 7}  # LEFT, NOOP, RIGHT
    # both worlds side by side, and the Genie world with right and left held from one prompt
    controls = ["evaluate.py", "controls", f"genie_true={tmp_path / 'genie.json'}", f"dit_true={tmp_path / 'dit.json'}",
                "--json", tmp_path / "controls.json", "--gif_models", true_genie, "--data", genie / "coinrun", "--gif",
                tmp_path / "controls.gif"]
    result = run(*controls)
    assert result.returncode == 0, result.stderr[-3000:]
    worlds = json.loads((tmp_path / "controls.json").read_text())
    assert worlds["dit_true"]["following_accuracy"] == figures["following_accuracy"]
    assert worlds["dit_true"]["copy_psnr"] == figures["latent_copy_psnr"] and worlds["genie_true"]["actions"] == "true"
    assert worlds["genie_true"]["following_accuracy"] is None  # evaluated without an IDM
    gif = iio.imread(tmp_path / "controls.gif")
    # right beside left at 4x; up to 13 frames (the prompt and 12), fewer where the GIF merges equal ones
    assert gif.shape[1:3] == (4 * 64, 2 * 4 * 64) and len(gif) <= 13
    assert_user_error(run(*controls[:2], "genie_true", *controls[4:]), "NAME=JSON")
    assert_user_error(run(*controls[:2], f"idm={tmp_path / 'idm.json'}", *controls[4:]), "is not a JSON that")


def test_true_actions_need_a_store_that_has_them_and_a_known_name(true_genie, true_dit, genie, diffusion_data,
                                                                 coinrun, tmp_path):
    store = sliding_store(coinrun, tmp_path / "no_actions", False, episodes=4)
    (store / "actions.npy").unlink()
    shutil.copytree(true_genie / "tokenizer", tmp_path / "models" / "tokenizer")
    assert_user_error(run("train_genie.py", "--phase", "dynamics", "--actions", "true", "--preset", "tiny", "--data",
                          store, "--out", tmp_path / "models"), "--actions true: ")
    assert not (tmp_path / "models" / "dynamics").exists() and not (tmp_path / "models" / "tokens").exists()
    latents = tmp_path / "latents"
    shutil.copytree(diffusion_data["latents"], latents)
    (latents / "actions.npy").unlink()
    assert_user_error(run("train_dit.py", latents, "--vae", diffusion_data["vae"], "--actions", "true", "--preset",
                          "tiny", "--out", tmp_path / "dit"), "has no true actions")
    assert_user_error(run("train_dit.py", diffusion_data["latents"], "--vae", diffusion_data["vae"], "--actions",
                          "true", "--lam", tmp_path, "--out", tmp_path / "dit"), "leave out --lam")
    assert not (tmp_path / "dit").exists()
    assert_user_error(run("generate.py", "--prompt_video", diffusion_data["store"], "--models", true_dit, "--actions",
                          "RIGHT,JUMP", "--output", tmp_path / "g.mp4"), "'JUMP' is neither")
    assert_user_error(run("play.py", "--models", true_genie, "--data", genie / "coinrun", "--actions", "FIRE",
                          "--output_dir", tmp_path / "p"), "'FIRE' is neither")
    assert_user_error(run("evaluate.py", "genie", store, "--models", true_genie, "--json", tmp_path / "e.json"),
                      "without actions")
    assert not any((tmp_path / name).exists() for name in ("g.mp4", "p", "e.json"))


@pytest.fixture(scope="module")
def sliding(coinrun, tmp_path_factory):
    """The sliding store (frames that show the action: LEFT, NOOP, RIGHT) and an IDM trained on it by evaluate.py."""
    store = sliding_store(coinrun, tmp_path_factory.mktemp("following") / "sliding", False)
    result = run("evaluate.py", "idm", store, "--steps", 150, "--batch_size", 32, "--json", store.parent / "idm.json")
    assert result.returncode == 0, result.stderr[-3000:]
    return store, load_model(InverseDynamics, idm_folder(store))


@torch.no_grad()
def test_the_real_held_transitions_score_the_ceiling_and_a_world_that_ignores_its_actions_chance(sliding):
    store, idm = sliding
    held = held_clips(FrameStore(store), 3, PROCGEN_ACTIONS, 16, np.random.default_rng(0))
    assert set(held) == {0, 1, 2} and all(clips.shape[1:] == (3, 3, 64, 64) for clips in held.values())
    count = min(len(clips) for clips in held.values())
    held = {c: clips[:count] for c, clips in held.items()}

    def replaying(prompt, action):  # a world that plays back the real clip of the class its action stands for
        return from_uint8(held[{5: 0, 3: 1, 7: 2}[action]])
    keys = {0: 5, 1: 3, 2: 7}
    figures = {**following_figures(idm, replaying, keys, held[0][:, :1], batch_size=64),
               **following_ceiling_figures(idm, held, batch_size=64, render=lambda clips: clips)}
    assert figures["following_ceiling"] > 0.9  # the IDM reads the sliding views (measured 1.0)
    assert figures["following_accuracy"] == pytest.approx(figures["following_ceiling"])
    assert figures["following_by_class"] == pytest.approx(figures["following_ceiling_by_class"])
    assert figures["following_ceiling_decoded"] == figures["following_ceiling"]  # an autoencoder that loses nothing

    def frozen(clips):  # an autoencoder that loses all motion: every frame comes back as the clip's first
        return clips[:, :1].expand_as(clips)
    figures = following_ceiling_figures(idm, held, batch_size=64, render=frozen)
    assert figures["following_ceiling_decoded"] == pytest.approx(1 / 3)  # whatever it reads, it reads for all classes
    assert figures["following_ceiling"] > 0.9

    def ignoring(prompt, action):  # the same frames whatever it is told
        return from_uint8(held[1])
    figures = following_figures(idm, ignoring, keys, held[0][:, :1], batch_size=64)
    assert figures["following_accuracy"] == pytest.approx(1 / 3)  # each transition is read as one class of three
    # a world whose keys all press the same action: its rollouts are read once, and follow one class at most
    readings = {}
    figures = following_figures(idm, replaying, {0: 3, 1: 3, 2: 3}, held[0][:, :1], batch_size=64, readings=readings)
    assert list(readings) == [3]
    assert figures["following_accuracy"] == pytest.approx(figures["following_by_class"]["none"] / 3)
    assert following_ceiling_figures(idm, held, batch_size=64)["following_ceiling_decoded"] is None  # no render


def test_an_untrained_reader_reads_nothing_into_the_ceiling_and_a_world_without_keys_follows_nothing(sliding):
    store, _ = sliding
    torch.manual_seed(0)
    constant = InverseDynamics(IDMConfig(["left", "none", "right"], [0, 1, 2]))
    held = held_clips(FrameStore(store), 3, PROCGEN_ACTIONS, 16, np.random.default_rng(0))
    assert following_figures(constant, None, {}, held[0][:, :1], batch_size=64)["following_accuracy"] == 0
    assert following_ceiling_figures(constant, held, batch_size=64)["following_ceiling"] < 0.7  # no key, no following


@pytest.mark.parametrize("labels, recovered", [(300, True), (3, False)])
def test_planted_labels_recover_a_planted_mapping(labels, recovered):
    """A LAM whose action 5 means left, 2 right, 7 jump and 0 nothing, 9 times in 10 (the rest noise): the keys fitted
    from enough labelled transitions are those; from a handful, not all of them."""
    rng = np.random.default_rng(0)
    names = ["LEFT", "RIGHT", "UP", "NOOP"]
    true = rng.integers(0, 4, labels)
    latent = np.where(rng.random(labels) < 0.9, np.array([5, 2, 7, 0])[true], rng.integers(0, 8, labels))
    keys = keys_from_labels(latent, true, names, "procgen:coinrun", 8)["keymap"]
    planted = {"ArrowLeft": 5, "ArrowRight": 2, "ArrowUp": 7, " ": 7, "ArrowDown": 0}
    assert (keys == planted) == recovered, keys


def test_a_latent_world_plays_with_the_keys_fitted_from_labels(genie, tmp_path):
    models = tmp_path / "models"
    for part in ("tokenizer", "lam", "dynamics"):
        shutil.copytree(genie / "models" / part, models / part)
    play = ["play.py", "--models", models, "--data", genie / "coinrun", "--controls", "game", "--actions", "1,2",
            "--output_dir", tmp_path / "out"]
    assert_user_error(run(*play), "--controls game: ")
    result = run("evaluate.py", "genie", genie / "coinrun", "--models", models, "--clips", 8, "--horizon", 3,
                 "--labels", 40, "--json", tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr[-3000:]
    controls = json.loads((models / "controls.json").read_text())
    assert controls["labels"] == 40 and len(controls["meaning"]) == 8
    assert set(controls["keymap"]) == {"ArrowLeft", "ArrowRight", "ArrowUp", " ", "ArrowDown"}
    result = run(*play)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("frame_*.png"))) == 3
    assert_user_error(run("evaluate.py", "genie", genie / "coinrun", "--models", models, "--labels", -1), "--labels")
