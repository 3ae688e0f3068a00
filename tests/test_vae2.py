"""The ViT-VAE of the diffusion pipeline (vae2.py), its training script, latent stores and its evaluation, on real
CoinRun frames rendered at 320x180: shapes, every pixel row reaching the latents and coming back, overfitting, the
model-folder round trip, train_vae.py on a real mp4, `dataset.py encode` against the model, SSIM, and bad input."""
import json
import math
import os
import pickle
import shutil
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_user_error, run
from dataset import FrameStore, LatentStore, WindowDataset, model_id, open_latents
from evaluate import psnr, ssim
from utils import UserError, from_uint8, load_model, save_model
from vae2 import PRESETS, VAEConfig, ViTVAE


def frames_of(store_path, count):
    """`count` frames spread over the store, (count, 3, 180, 320) floats in [-1, 1]."""
    store = FrameStore(store_path)
    return from_uint8(torch.stack([store.window(int(i), 1)["frames"][0]
                                   for i in np.linspace(0, store.count - 1, count)]))


def test_config_and_shapes(diffusion_data):
    config = VAEConfig()
    assert (config.rows, config.cols, config.tokens, config.latent_dim) == (11, 20, 220, 48)
    torch.manual_seed(0)
    model, x = ViTVAE(PRESETS["tiny"]).eval(), frames_of(diffusion_data["store"], 4)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (4, 220, 48)
        recon = model.decode(mu)
        assert recon.shape == (4, 3, 180, 320) and recon.abs().max() <= 1
        loss, logs = model(x.view(2, 2, 3, 180, 320), beta=0.1, diff_weight=1.0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(logs) >= {"mse", "kl", "psnr", "diff"}
    assert all(torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad for v in logs.values())  # no host sync
    assert logs["psnr"].item() == pytest.approx(10 * math.log10(4 / logs["mse"].item()), rel=1e-5)
    with pytest.raises(ValueError, match="2 frames"):
        model(x[:, None], diff_weight=1.0)


def test_the_bottom_four_pixel_rows_reach_the_latents_and_come_back(diffusion_data):
    model, x = load_model(ViTVAE, diffusion_data["vae"]), frames_of(diffusion_data["store"], 2)
    changed = x.clone()
    changed[:, :, 176:] = -changed[:, :, 176:]  # only the 4 rows that 16 does not divide
    with torch.no_grad():
        mu, mu_changed = model.encode(x)[0], model.encode(changed)[0]
    # the bottom patch row's latents move (the seed's patching never saw these rows)
    assert (mu_changed - mu)[:, -20:].abs().amax() > 0.05
    # and every output row depends on the latents: rows 176..179 come from the bottom row's latents
    z = mu.clone().requires_grad_(True)
    model.decode(z)[:, :, 176:].sum().backward()
    assert z.grad[:, -20:].abs().sum() > 0


def test_tiny_vae_overfits_real_frames_every_row_included(diffusion_data):
    torch.manual_seed(0)
    x = frames_of(diffusion_data["store"], 4)
    model = ViTVAE(PRESETS["tiny"])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def errors():
        with torch.no_grad():
            recon = model.eval().decode(model.encode(x)[0])
        model.train()
        return F.mse_loss(recon, x).item(), F.mse_loss(recon[:, :, 176:], x[:, :, 176:]).item()
    before, before_bottom = errors()
    for _ in range(30):
        loss, _ = model(x[:, None], beta=1e-4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after, after_bottom = errors()
    spread = ((x - x.mean(0)) ** 2).mean().item()  # error of the best single image for all 4 frames
    # measured on 2 CPU cores, seeds 0-2: from the flat grey start the error falls 10-11x overall and 12x on the
    # bottom 4 rows
    assert after < before / 5, (before, after)
    assert after_bottom < before_bottom / 5, (before_bottom, after_bottom)
    assert after < 0.3 * spread, (after, spread)


def test_focus_spends_the_reconstruction_on_the_players_pixels(diffusion_data):
    """As the Genie tokenizer's focus (test_tokenizer): the same seed and frames with and without a focus on the box
    where CoinRun keeps the agent at 320x180; the focused VAE reconstructs the box better, and logs the plain error."""
    x, box = frames_of(diffusion_data["store"], 4), (slice(None), slice(None), slice(79, 124), slice(100, 220))
    errors = {}
    for focus in ([], [79, 100, 124, 220]):
        torch.manual_seed(0)
        model = ViTVAE(replace(PRESETS["tiny"], focus=focus, focus_weight=100.0))
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(30):
            loss, _ = model(x[:, None])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            loss, logs = model(x[:, None])
            error = (model.eval().decode(model.encode(x)[0]) - x) ** 2
        assert (loss == logs["mse"]).item() == (not focus)  # the weighted error trains, the plain one is logged
        errors[bool(focus)] = error[box].mean().item()
    # measured on the demo's 320x180 store, seeds 0-2: the box's error 0.65-0.85 times the plain VAE's
    assert errors[True] < 0.9 * errors[False], errors
    with pytest.raises(ValueError, match="focus takes"):
        ViTVAE(replace(PRESETS["tiny"], focus=[79, 100, 124, 330]))
    # the DiT weighs the patches the box touches; the bottom patch row also holds the 4 rows 16 does not divide
    assert VAEConfig(focus=[79, 100, 124, 220]).focus_patches == [4, 6, 8, 14]
    assert VAEConfig(focus=[170, 0, 180, 17]).focus_patches == [10, 0, 11, 2] and VAEConfig().focus_patches == []


def test_model_folder_reloads_with_no_flags(diffusion_data, tmp_path):
    trained = load_model(ViTVAE, diffusion_data["vae"])
    assert trained.config == PRESETS["tiny"] and not trained.training
    torch.manual_seed(0)
    config = replace(PRESETS["tiny"], latent_dim=16, decoder_depth=1)
    model, x = ViTVAE(config).eval(), frames_of(diffusion_data["store"], 2)
    save_model(model, tmp_path / "vae")
    assert {p.name for p in (tmp_path / "vae").iterdir()} == {"config.json", "model.safetensors"}
    loaded = load_model(ViTVAE, tmp_path / "vae")
    assert loaded.config == config
    with torch.no_grad():
        mu, logvar = model.encode(x)
        assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x), (mu, logvar)))
        assert torch.equal(loaded.decode(mu), model.decode(mu))


def test_train_vae_on_a_real_mp4(coinrun_video, tmp_path):
    out, samples = tmp_path / "models" / "vae2", tmp_path / "recon.png"
    result = run("train_vae.py", coinrun_video, "--preset", "tiny", "--steps", 4, "--batch_size", 2, "--out", out,
                 "--samples", samples, "--diff_weight", 1, "--beta_max", 0.1, "--beta_start_step", 2,
                 "--beta_warmup_steps", 2, "--num_workers", 0, "--log_every", 2, "--sample_every", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_model(ViTVAE, out).config == PRESETS["tiny"]
    image = cv2.imread(str(samples))
    # held-out frames (the video's last 10 %: 3 of its 30 frames at 12 fps) above their reconstructions
    assert image.shape == (2 * 180, 3 * 320, 3)
    log = json.loads((tmp_path / "models" / "logs" / "vae2.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 4]
    assert [e["beta"] for e in log] == [0.0, 0.0, 0.1]  # 0 until step 2, then up to --beta_max over 2 steps
    assert all("diff" in e and math.isfinite(e["loss"]) for e in log)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_encode_writes_the_models_latents_in_windows_that_stay_in_episodes(diffusion_data):
    frames, latents = FrameStore(diffusion_data["store"]), LatentStore(diffusion_data["latents"])
    vae = load_model(ViTVAE, diffusion_data["vae"])
    assert latents.count == frames.count and latents.latent_shape == (220, 48)
    assert latents.episodes() == frames.episodes() and latents.levels == frames.levels and latents.fps == frames.fps
    assert latents.has_actions and np.array_equal(latents.actions, frames.actions)
    assert latents.meta["vae_id"] == model_id(diffusion_data["vae"]) and latents.meta["frames"] == str(frames.path)
    index = [0, 99, 100, 299]
    with torch.no_grad():
        mu, logvar = vae.encode(from_uint8(torch.stack([frames.window(i, 1)["frames"][0] for i in index])))
    torch.testing.assert_close(torch.from_numpy(np.array(latents.mu[index])).float(), mu, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(np.array(latents.logvar[index])).float(), logvar, rtol=1e-3, atol=2e-3)
    all_mu = np.asarray(latents.mu, dtype=np.float64)
    assert latents.scale == pytest.approx(1 / all_mu.std(), rel=1e-3)

    dataset = WindowDataset(diffusion_data["latents"], seq_len=8, split="train")
    episodes = latents.episodes()
    for i in range(0, len(dataset), 7):
        start = int(dataset.starts[i])
        assert any(s <= start and start + 8 <= e for s, e in episodes), start
        item = dataset[i]
        assert item["mu"].shape == item["logvar"].shape == (8, 220, 48) and item["mu"].dtype == torch.float16
        assert item["actions"].shape == (8,)
        assert torch.equal(item["mu"], torch.from_numpy(np.array(latents.mu[start:start + 8])))
    assert len(WindowDataset(latents, seq_len=8, split="val")) > 0  # a held-out level for the DiT's samples
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[3]["mu"], dataset[3]["mu"])  # DataLoader workers


def test_open_latents_encodes_once_and_again_when_the_vae_changes(diffusion_data, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(diffusion_data["store"], store)
    first = open_latents(store, diffusion_data["vae"], "cpu")
    assert first.path == tmp_path / "store_latents"
    mtime = (first.path / "mu.f16").stat().st_mtime_ns
    assert open_latents(store, diffusion_data["vae"], "cpu").path == first.path
    assert (first.path / "mu.f16").stat().st_mtime_ns == mtime  # reused, not encoded again
    assert open_latents(first.path, diffusion_data["vae"], "cpu").vae_id == first.vae_id

    torch.manual_seed(1)
    save_model(ViTVAE(PRESETS["tiny"]), tmp_path / "other_vae")
    with pytest.raises(UserError, match="re-encode"):
        open_latents(first.path, tmp_path / "other_vae", "cpu")
    again = open_latents(store, tmp_path / "other_vae", "cpu")
    assert again.vae_id == model_id(tmp_path / "other_vae") != first.vae_id


def test_evaluate_vae_writes_finite_psnr_and_ssim(diffusion_data, tmp_path):
    out = tmp_path / "vae_eval.json"
    result = run("evaluate.py", "vae", diffusion_data["store"], "--vae", diffusion_data["vae"], "--frames", 16,
                 "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["frames"] == 16 and figures["vae"] == str(diffusion_data["vae"])
    assert math.isfinite(figures["psnr"]) and -1 < figures["ssim"] <= 1


def test_ssim_and_psnr(diffusion_data):
    x = frames_of(diffusion_data["store"], 4).view(2, 2, 3, 180, 320)
    assert ssim(x, x).shape == psnr(x, x).shape == (2, 2)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, 2))
    generator = torch.Generator().manual_seed(0)
    scores = [ssim(x, (x + sigma * torch.randn(x.shape, generator=generator)).clamp(-1, 1)).mean().item()
              for sigma in (0.02, 0.1, 0.3)]
    assert 1 > scores[0] > scores[1] > scores[2] > 0, scores
    # flat images: the variance terms cancel and SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1) on [0, 1]
    a, b = torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), -0.4)  # 0.6 and 0.3 on [0, 1]
    assert ssim(a, b).item() == pytest.approx((2 * 0.6 * 0.3 + 1e-4) / (0.36 + 0.09 + 1e-4), rel=1e-5)


@pytest.fixture(scope="module")
def small_store(coinrun_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "coinrun_64"
    result = run("dataset.py", "prepare", coinrun_video, "--size", "64x64", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_bad_input_is_one_line_and_writes_nothing(diffusion_data, small_store, tmp_path):
    assert_user_error(run("train_vae.py", small_store, "--preset", "tiny", "--steps", 1, "--out", tmp_path / "v"),
                      "holds 64x64 frames; the model takes 320x180 (make a store of that size: `python dataset.py "
                      "prepare VIDEO --size 320x180`")
    assert_user_error(run("dataset.py", "encode", small_store, "--vae", diffusion_data["vae"], "--out", tmp_path / "l"),
                      "holds 64x64 frames")
    assert_user_error(run("dataset.py", "encode", diffusion_data["store"], "--vae", tmp_path / "no_vae",
                          "--out", tmp_path / "l"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    bad = tmp_path / "bad_latents"
    shutil.copytree(diffusion_data["latents"], bad)
    with open(bad / "mu.f16", "r+b") as f:
        f.truncate(os.path.getsize(bad / "mu.f16") - 1000)
    assert_user_error(run("dataset.py", "info", bad), "mu.f16 holds")
    with pytest.raises(UserError, match="truncated or foreign"):
        WindowDataset(bad, 4)
