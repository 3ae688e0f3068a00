"""Measure trained world models on held-out data, next to baselines; figures go to a table, JSON and plots.

  python evaluate.py genie --models models/genie videos/coinrun              # held-out CoinRun levels
  python evaluate.py genie --models models/genie videos/coinrun --clips 256 --horizon 16 --json results/genie_eval.json
  python evaluate.py vae --vae models/vae2 videos/z8r255LoVJc_12fps_320x180   # held-out stretch of the footage
  python evaluate.py dit --models models/ videos/z8r255LoVJc_12fps_320x180 --horizon 16
  python evaluate.py idm videos/coinrun       # how well the true actions can be read off two frames at all
  python evaluate.py controls genie_true=results/genie_true_eval.json genie_latent=results/genie_eval.json \
      --gif_models models/genie_true models/genie   # worlds side by side -> results/controls_eval.json and a GIF
  python evaluate.py plot models/genie/logs/tokenizer.json models/genie_4x/logs/tokenizer.json --out results/tok.png

genie reports:
  tokenizer_psnr, codebook_used        reconstruction PSNR (dB) and the fraction of the codebook used on held-out frames
  lam_usage, lam_codes_used,           fraction of transitions per latent action, actions with >= 2 % of them,
  lam_perplexity, nmi                  exp(entropy) of the usage, and the normalised mutual information between
                                       latent actions and the true actions the collector recorded (the models never
                                       saw them); the confusion table (true x latent) is drawn to a PNG heat map
  nmi_effect, effect_accuracy,         the same against what the player sees an action do (`action_effect`: procgen
  horizontal_accuracy                  left/none/right x jump or not, ALE the action name's directions and fire):
                                       NMI with these effect classes, and the accuracy of mapping each latent action
                                       to its most frequent effect class (to its most frequent horizontal direction)
  probe_accuracy                       a linear probe (logistic regression) from the LAM's code before quantisation
                                       to the effect class, fitted on clips of the training levels, scored here
  meaning                              per latent action: its most frequent effect, that effect's share and count;
                                       also written to MODELS/meaning.json, where play.py finds it to label the
                                       actions and map the arrow keys
  *_chance, effect_majority            each figure for the same latent actions shuffled (the level of chance), and
                                       the share of the most frequent effect class (what a constant guess scores)
  delta_psnr_t4, delta_psnr_long       controllability (Genie's Delta_t PSNR): PSNR of frames generated with the
                                       latent actions inferred from the real clip minus PSNR with random latent
                                       actions, at t = 4 and at t = --horizon, at --cfg_scale; *_unguided: the same
                                       at guidance 1 (guidance moves the random-action rollout too)
  rollout_psnr, baseline_psnr          PSNR per horizon step of the inferred-action rollout, and of copying the
                                       prompt frame (the baseline a world model must beat)
  token_copy_psnr                      copying the prompt frame's tokens: what a dynamics that keeps every token
                                       scores through the tokenizer (the copy baseline with the tokenizer's error)
  baseline_exact                       per horizon step, the share of clips whose frame equals the prompt frame: a
                                       copy scores the 100 dB cap on those, which lifts the baselines' means (the
                                       player stood still)
  lam_rollout_psnr,                    the LAM's own decoder rolled forward from the prompt frame as a world model in
  lam_random_action_psnr,              pixels, with the inferred and with random latent actions, and its Delta PSNR at
  lam_delta_psnr_t4, lam_delta_psnr_long  t = 4 and t = --horizon: how far the actions lead a model that reads them
                                       in pixels, beside the dynamics', which reads them through the tokens
  lam_decoder_gain_db,                 the LAM's own decoder predicting each next frame of the clips: its error with
  lam_decoder_vs_copy_db               random actions over its error with the inferred ones, in dB (what the actions
                                       tell it), and the error of copying the frame before over it (negative: the
                                       decoder is still worse than a copy)

genie on a world of the game's true actions (train_genie.py --actions true) reports instead:
  rollout_psnr, random_action_psnr,    the rollout under the recorded actions and under random ones of the game, the
  delta_psnr_t4, delta_psnr_long       controllability between them; baseline_psnr, token_copy_psnr, tokenizer_psnr
  next_frame_ce, action_information    the cross-entropy (nats per token) of the next frame's tokens, all masked,
                                       after a context's worth of real frames, with the recorded, random and no
                                       actions; action_information = random - recorded: what the dynamics takes from
                                       its action, with no IDM in between
  tokens_changed                       the share of tokens that change from one real frame to the next
  following_accuracy,                  from each held-out prompt each horizontal class (left, none, right) is held for
  following_ceiling,                   FOLLOW_FRAMES frames through the world's action for it (its key: LEFT, NOOP,
  following_ceiling_decoded,           RIGHT); the inverse dynamics model of `idm` (--idm, default DATA_idm) names the
  following_by_class                   class each transition shows; the share read as the class held, averaged over
                                       the classes, next to the same reading of real held-out clips during which the
                                       true actions held one class (the ceiling), and of those clips through the
                                       world's tokenizer or VAE (decoded: what its autoencoder leaves to read). A world
                                       that ignores its actions scores a third; one as good as the game, the ceiling
a latent Genie world adds, for each of --labels N (labelled training transitions, 0: all):
  controls, key_labels,                the game's keys fitted from N labels (each latent action takes the effect it
  following_accuracy,                  most often had among them; fit_controls) and the world's following figure
  following_ceiling                    through them; the first N's keys go to MODELS/controls.json (play.py
                                       --controls game) and its figures to the top level

controls gathers several worlds' genie or dit JSONs (-> results/controls_eval.json), one entry per NAME:
  following_accuracy, following_ceiling, following_ceiling_decoded, following_by_class, delta_psnr_t4 (at
  cfg_scale), delta_psnr_t4_unguided, rollout_psnr, copy_psnr (the prompt's tokens or latent copied: a world that
  changes nothing), copy_frame_psnr,
  actions ("true" or "latent"), for a latent world labels (the labelled transitions its keys came from) and
  following_by_labels; following_of_ceiling, and for a latent world following_of_true_world (its pipeline's
  true-action world's following). With --gif_models it also writes a GIF: a held-out prompt, "right" held beside
  "left" held for 12 frames, a row per Genie world

vae reports (-> results/vae_eval.json):
  psnr, ssim                           reconstruction decode(mu) of --frames held-out frames (the 'val' split: held-out
                                       levels, episodes, or the last 10 % of a single video): PSNR (dB) and SSIM
                                       (Gaussian window 11x11, sigma 1.5, on [0, 1] images, averaged over channels)

idm reports (-> results/idm_eval.json), the ceiling for the genie latent-action figures of the same names:
  effect_accuracy, horizontal_accuracy a supervised inverse dynamics model (a small conv net on frames t and t + 1,
  nmi_effect, effect_majority          trained --steps steps on the true effect classes of the training levels) scored
                                       on held-out transitions: how much of what the player did two frames show at
                                       all. A LAM learns without labels, so these bound what its figures can reach.
                                       The model is saved beside the store (DATA_idm, or --out): the reader of the
                                       following figures
  horizontal_accuracy_one_frame,       the same held-out transitions read from the later frame twice, and from the
  horizontal_accuracy_reversed,        pair in reverse order: how much of the horizontal reading needs no motion (a
  horizontal_none_share                reader of motion alone scores about the share with no horizontal action)

dit reports (-> results/dit_eval.json and a plot beside it), each a list over horizon steps 1..--horizon:
  psnr, ssim                           the DiT's continuation of --clips held-out clips (prompt: --prompt_frames true
                                       frames through the VAE) against the true continuation
  baseline_psnr, baseline_ssim         copying the last prompt frame on the same windows (a world model must beat it)
  recon_psnr                           the VAE's reconstruction of the true frames: the ceiling the DiT works under
  latent_copy_psnr                     copying the last prompt frame's latent: a DiT that moves nothing scores this
                                       through the VAE (the copy baseline with the VAE's error)
  baseline_exact                       as genie's: the share of windows whose frame equals the last prompt frame
  best_of_k_psnr                       with --samples K > 1: per clip and step the best PSNR of K continuations
                                       (other noise, same prompt), averaged over the clips: the usual measure for a
                                       stochastic predictor, which may pick any of the futures the prompt allows
  a DiT with latent actions (train_dit.py --lam; its LAM in MODELS/lam) is led on by the LAM's reading of the true
  continuation (psnr, also as rollout_psnr), and adds:
  random_action_psnr, delta_psnr_t4,   the same prompts led on by random latent actions, and the controllability
  delta_psnr_long                      psnr - random_action_psnr at t = 4 and at t = --horizon (as genie's, with
                                       *_unguided where --cfg_scale is not 1)
  lam_usage, lam_codes_used            the share of the clips' transitions per latent action, those with >= 2 %
  lam_decoder_gain_db,                 as genie's, on the first clip of the LAM's labelling length in each window
  lam_decoder_vs_copy_db
  nmi, nmi_effect, effect_accuracy,    where the store holds the true actions: as genie's, and MODELS/meaning.json
  horizontal_accuracy, meaning         for play.py
"""
import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm import tqdm

import dit
import dynamics
from dataset import FrameStore, WindowDataset, action_effect, effect_classes, open_frames, require_size, \
    spread_frames
from generate import CFG_SCALE, encode_clips, inferred_actions, load_world
from lam import LatentActionModel
from utils import UserError, add_precision_flag, atomic_path, atomic_write_text, autocast, from_uint8, get_device, \
    load_model, positive, run_cli, save_model, seed_everything, to_uint8, write_gif
from vae import Tokenizer
from vae2 import ViTVAE


def psnr(a, b):
    """Per-frame PSNR (dB) of frames in [-1, 1]: (..., C, H, W) -> (...)."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(-3).mean(-1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def same_frame(a, b):
    """1.0 where two frames (..., C, H, W) are identical, else 0.0: -> (...)."""
    return (a == b).flatten(-3).all(-1).float()


def ssim(a, b):
    """Per-frame SSIM (Wang et al. 2004) of frames in [-1, 1]: (..., C, H, W) -> (...).

    Computed on [0, 1] images with an 11x11 Gaussian window (sigma 1.5) over the positions where the window fits, each
    channel separately, then averaged over channels and positions; the constants are (0.01)^2 and (0.03)^2.
    """
    with torch.autocast(a.device.type, enabled=False):  # float32 blurs, also where the models ran in bf16
        return _ssim(a, b)


def _ssim(a, b):
    lead, (c, h, w) = a.shape[:-3], a.shape[-3:]
    x, y = ((t.float().reshape(-1, 1, h, w) + 1) / 2 for t in (a, b))  # (M, 1, H, W), one image per channel
    g = torch.exp(-(torch.arange(11, device=x.device) - 5.0) ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()

    def blur(t):  # separable Gaussian: rows, then columns
        return F.conv2d(F.conv2d(t, g.view(1, 1, 11, 1)), g.view(1, 1, 1, 11))
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))  # (M, 1, H-10, W-10)
    return index.reshape(*lead, c, -1).mean(dim=(-2, -1))


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalised_mutual_information(x, y):
    """NMI with the arithmetic mean of the entropies (scikit-learn's default): 2 I(X; Y) / (H(X) + H(Y))."""
    joint = np.zeros((x.max() + 1, y.max() + 1))
    np.add.at(joint, (x, y), 1)
    joint /= joint.sum()
    hx, hy = entropy(joint.sum(1)), entropy(joint.sum(0))
    mutual = hx + hy - entropy(joint.ravel())
    return 2 * mutual / (hx + hy) if hx + hy > 0 else 0.0


def mapping_accuracy(latent, labels):
    """Accuracy of naming each latent action by the label it most often has: (M,) ints, (M,) ints -> float."""
    table = np.zeros((latent.max() + 1, labels.max() + 1), np.int64)
    np.add.at(table, (latent, labels), 1)
    return float(table.max(1).sum() / len(latent))


def linear_probe(train_x, train_y, test_x, test_y, classes):
    """Accuracy on (test_x, test_y) of a logistic regression fitted on (train_x (M, C) float, train_y (M,) int):
    how much of the label a linear read-out of the features holds. Deterministic (full-batch L-BFGS, float64)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, test = (torch.as_tensor((a - mean) / std, dtype=torch.float64) for a in (train_x, test_x))
    y = torch.as_tensor(train_y)
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    return float(((test @ weight + bias).argmax(1).numpy() == test_y).mean())


def latent_action_figures(latent, true, names, source, num_actions, rng):
    """Figures of latent actions (M,) against the true actions (M,) named `names` in a store from `source`: usage,
    NMI with the true actions and with their effect classes, mapping accuracies, the meaning table; each figure also
    for the latents shuffled by rng (_chance)."""
    effect_names, effect_of, horizontal_of = effect_classes(names, source)
    effect, horizontal = effect_of[true], horizontal_of[true]  # (M,), (M,)
    shuffled = rng.permutation(latent)
    usage = np.bincount(latent, minlength=num_actions) / len(latent)
    figures = {"lam_usage": usage.tolist(), "lam_codes_used": int((usage >= 0.02).sum()),
               "lam_perplexity": float(np.exp(entropy(usage))), "effects": effect_names,
               "effect_majority": float(np.bincount(effect).max() / len(effect))}
    # NMI is biased upwards on few samples: the same latent actions shuffled give the level of chance.
    for suffix, lat in (("", latent), ("_chance", shuffled)):
        figures.update({f"nmi{suffix}": normalised_mutual_information(true, lat),
                        f"nmi_effect{suffix}": normalised_mutual_information(effect, lat),
                        f"effect_accuracy{suffix}": mapping_accuracy(lat, effect),
                        f"horizontal_accuracy{suffix}": mapping_accuracy(lat, horizontal)})
    figures["meaning"] = meaning_table(latent, effect, effect_names, num_actions)
    return figures


def meaning_table(latent, effect, effect_names, num_actions):
    """What each latent action most often did: latent actions (M,) and the effect classes of the same transitions
    (M,) -> [{"action", "effect", "share", "count"}, ...], "unused" for an action none of them took."""
    table = []
    for a in range(num_actions):
        counts = np.bincount(effect[latent == a], minlength=len(effect_names))
        top = int(counts.argmax())
        table.append({"action": a, "effect": effect_names[top] if counts.sum() else "unused",
                      "share": float(counts[top] / max(1, counts.sum())), "count": int(counts.sum())})
    return table


@torch.no_grad()
def fit_controls(infer, num_actions, store, labels, clip_len, rng, batch_size, device):
    """The game's keys for a latent world, from `labels` labelled transitions of the training levels (0: all of
    them): infer(clips (B, clip_len, 3, H, W) in [-1, 1]) -> the world's latent actions (B, clip_len - 1), as its LAM
    reads them; each of the num_actions latent actions gets the effect it most often had among them
    (keys_from_labels). -> {"labels", "meaning", "keymap"}."""
    names = store.action_names
    dataset = WindowDataset(store, clip_len, split="train")
    # random clips, as many as hold the labels; for all of them, one clip per clip_len - 1 frames of the levels
    clips = len(dataset) // (clip_len - 1) if labels == 0 else min(len(dataset), -(-labels // (clip_len - 1)))
    latent, true = [], []
    for chunk in np.array_split(rng.choice(len(dataset), clips, replace=False), max(1, clips // batch_size)):
        batch = [dataset[int(j)] for j in chunk]
        latent.append(infer(from_uint8(torch.stack([b["frames"] for b in batch]).to(device))).flatten().cpu())
        true.append(torch.stack([b["actions"][:-1] for b in batch]).flatten())
    latent, true = torch.cat(latent).numpy()[:labels or None], torch.cat(true).numpy()[:labels or None]
    return {"labels": len(latent), **keys_from_labels(latent, true, names, store.meta["source"], num_actions)}


def keys_from_labels(latent, true, names, source, num_actions):
    """Latent actions (M,) and the true actions (M,) of the same transitions, of a game whose actions are `names` ->
    {"meaning": what each latent action most often did, "keymap": the game's keys -> latent actions}."""
    from play import default_keymap
    effect_names, effect_of, _ = effect_classes(names, source)
    meaning = meaning_table(latent, effect_of[true], effect_names, num_actions)
    return {"meaning": meaning, "keymap": default_keymap(meaning)}


def draw_confusion(path, table, row_names, title):
    """A heat map of `table` (true action x latent action), each row normalised, written as PNG with OpenCV."""
    cell, left, top = 40, 110, 60
    rows, cols = table.shape
    image = np.full((top + rows * cell + 10, left + cols * cell + 10, 3), 255, np.uint8)
    share = table / np.maximum(table.sum(1, keepdims=True), 1)
    for i in range(rows):
        cv2.putText(image, row_names[i][:12], (4, top + i * cell + 25), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        for j in range(cols):
            shade = int(255 * (1 - share[i, j]))
            x, y = left + j * cell, top + i * cell
            cv2.rectangle(image, (x, y), (x + cell - 2, y + cell - 2), (255, shade, shade), -1)
            text_colour = (255, 255, 255) if share[i, j] > 0.5 else (0, 0, 0)
            cv2.putText(image, f"{share[i, j]:.0%}"[:4], (x + 3, y + 24), cv2.FONT_HERSHEY_SIMPLEX, 0.33, text_colour, 1)
    for j in range(cols):
        cv2.putText(image, str(j), (left + j * cell + 14, top - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(image, title, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), image[..., ::-1])


def check_game(store, config, data):
    """A world trained on a game's true actions is evaluated on that game's frames with their actions (a latent world
    on any frames)."""
    if config.actions == "true" and (not store.has_actions or store.meta["source"] != config.game):
        raise UserError(f"{data} holds {store.meta['source']}{'' if store.has_actions else ' without actions'}; the "
                        f"world was trained on the true actions of {config.game}: evaluate it on a store of that game")


def write_meaning(models, data, transitions, meaning):
    """MODELS/meaning.json, where play.py finds what each latent action does (play.read_meaning)."""
    atomic_write_text(models / "meaning.json", json.dumps({"data": str(data), "transitions": transitions,
                                                           "meaning": meaning}, indent=1))


@torch.no_grad()
def rollout(tokenizer, sampler, first, actions, generator):
    """Generate frames from the prompt first (B, 3, H, W) and actions (B, L): -> (B, L, 3, H, W)."""
    sampler.start(tokenizer.encode(first)[:, None])
    return torch.stack([tokenizer.decode(sampler.step(actions[:, t], generator)) for t in range(actions.shape[1])], 1)


@torch.no_grad()
def next_frame_ce(model, tokens, actions, generator):
    """What a Genie dynamics takes from its action: the cross-entropy (nats per token) of the last frame's tokens,
    all masked (the first decoding step's view), given the real frames before it. tokens (B, T, rows, cols), actions
    (B, T - 1) that led from each frame to the next -> (3,): with those actions, with random ones, with "no action"."""
    target = tokens.flatten(2)  # (B, T, N)
    masked = torch.cat([target[:, :-1], torch.full_like(target[:, -1:], model.mask_token)], dim=1)
    shuffled = torch.randint(0, model.config.num_actions, actions.shape, device=actions.device, generator=generator)
    ce = []
    for acts in (actions, shuffled, torch.full_like(actions, model.no_action)):
        logits = model.head(model.hidden(masked, model.frame_conditions(acts)))[:, -1]  # (B, N, V)
        ce.append(F.cross_entropy(logits.flatten(0, 1).float(), target[:, -1].flatten()))
    return torch.stack(ce)


@torch.no_grad()
def lam_codes(action_model, dataset, rng, clips, batch_size, device):
    """The LAM's codes before quantisation and the true actions of `clips` random clips of dataset -> (M, C), (M,)."""
    picks = rng.choice(len(dataset), min(clips, len(dataset)), replace=False)
    codes, true = [], []
    for i in range(0, len(picks), batch_size):
        batch = [dataset[int(j)] for j in picks[i:i + batch_size]]
        frames = from_uint8(torch.stack([b["frames"] for b in batch]).to(device))
        codes.append(action_model.encode(frames).flatten(0, 1).float().cpu())
        true.append(torch.stack([b["actions"][:-1] for b in batch]).flatten())
    return torch.cat(codes).numpy(), torch.cat(true).numpy()


@torch.no_grad()
def lam_decoder_errors(action_model, clips, actions, generator):
    """The LAM's own decoder on clips (B, T, ...) of its input kind, given the actions its encoder inferred (B, T - 1),
    given random actions, and copying the previous frame instead -> mean squared errors (3,) over the transitions.
    The first two tell how much the actions say about the next frame, as far as the LAM's decoder can read them: a
    dynamics trained on actions its own LAM's decoder ignores has little reason to use them."""
    target, past = action_model.tokens(clips[:, 1:]).float(), clips[:, :-1]
    shuffled = torch.randint(0, action_model.config.num_actions, actions.shape, device=actions.device,
                             generator=generator)
    errors = [(action_model.decode(past, action_model.action_embedding(a)).float() - target).square().mean()
              for a in (actions, shuffled)]
    return torch.stack(errors + [(action_model.tokens(past).float() - target).square().mean()]).cpu()


@torch.no_grad()
def lam_rollout(action_model, first, actions):
    """The LAM's own decoder rolled forward as a world model on pixels: the first frames (B, 3, H, W) and actions
    (B, L) -> frames (B, L, 3, H, W), each predicted from the generated frames before it and its action. Only the
    frames its decoder reads are decoded again at each step."""
    frames, window = first[:, None], action_model.decoder_frames
    for t in range(actions.shape[1]):
        start = 0 if window is None else max(0, t + 1 - window)
        tokens = action_model.decode(frames[:, start:], action_model.action_embedding(actions[:, start:t + 1]))[:, -1:]
        frames = torch.cat([frames, action_model.frames_of(tokens).clamp(-1, 1)], dim=1)
    return frames[:, 1:]


def lam_decoder_figures(errors):
    """Mean squared errors (inferred, random, copy) -> the decoder's gain in dB from its inferred actions over random
    ones, and over copying the previous frame (negative: the decoder is worse than a copy)."""
    inferred, shuffled, copy = errors.tolist()
    return {"lam_decoder_gain_db": 10 * math.log10(shuffled / inferred),
            "lam_decoder_vs_copy_db": 10 * math.log10(copy / inferred)}


def print_lam_decoder(results):
    print(f"LAM decoder           its actions vs random ones {results['lam_decoder_gain_db']:+.2f} dB, vs copying "
          f"the previous frame {results['lam_decoder_vs_copy_db']:+.2f} dB")


FOLLOW_FRAMES = 4  # frames each horizontal class is held for in the following figure


def following_judge(args, store, prompts, rng, device, render=None):
    """The judge of how worlds on `store` follow held actions from `prompts`, read by the IDM in --idm (default
    DATA_idm, made by evaluate.py idm): the held-out clips and the ceilings (following_ceiling_figures, render being
    the worlds' autoencoder) are computed once -> judge(world_rollout, chosen, readings=None) -> following_figures and
    the ceilings; with no IDM yet, a note and a judge that returns {}."""
    folder = Path(args.idm or idm_folder(store.path))
    if not (folder / "config.json").is_file():
        print(f"no following figure: no inverse dynamics model in {folder} (python evaluate.py idm {args.data})")
        return lambda world_rollout, chosen, readings=None: {}
    idm = load_model(InverseDynamics, folder, device)
    held = held_clips(store, FOLLOW_FRAMES + 1, store.action_names, len(prompts), rng)
    ceilings = {**following_ceiling_figures(idm, held, args.batch_size, render), "follow_frames": FOLLOW_FRAMES}
    return lambda world_rollout, chosen, readings=None: {
        **following_figures(idm, world_rollout, chosen, prompts, args.batch_size, readings), **ceilings}


def dit_holder(vae, model, sampler, generator):
    """following_figures' world_rollout of a diffusion world; the prompt's frames are led to by "no action", as
    play.py's prompt."""
    def hold(prompt, action):  # prompt (B, P, 3, H, W) -> its last frame through the VAE, then FOLLOW_FRAMES frames
        b, p = prompt.shape[:2]
        draws, means = encode_clips(vae, model, prompt, generator)
        actions = torch.cat([model.no_action(draws[:, :, 0, 0]), torch.full((b, FOLLOW_FRAMES), action,
                                                                            device=prompt.device)], dim=1)
        latents = torch.cat([means[:, -1:], sampler.rollout(draws, FOLLOW_FRAMES, generator, actions)], dim=1)
        return vae.decode((latents / model.config.latent_scale).flatten(0, 1)).float().unflatten(0, (b, -1))
    return hold


def through_tokenizer(tokenizer):
    """following_figures' render of a Genie world: clips (B, T, 3, H, W) -> as its tokenizer reconstructs them."""
    return lambda clips: tokenizer.decode(tokenizer.encode(clips.flatten(0, 1))).unflatten(0, clips.shape[:2])


def through_vae(vae):
    """following_figures' render of a diffusion world: clips (B, T, 3, H, W) -> decode(mu) of its ViT-VAE."""
    return lambda clips: vae.decode(vae.encode(clips.flatten(0, 1))[0]).float().unflatten(0, clips.shape[:2])


def genie_holder(tokenizer, sampler, generator):
    """following_figures' world_rollout of a Genie world."""
    def hold(prompt, action):  # prompt (B, 1, 3, H, W) -> it and FOLLOW_FRAMES frames under the action
        actions = torch.full((len(prompt), FOLLOW_FRAMES), action, device=prompt.device)
        seen = tokenizer.decode(tokenizer.encode(prompt[:, -1]))[:, None]  # the prompt as the world renders it
        return torch.cat([seen, rollout(tokenizer, sampler, prompt[:, -1], actions, generator)], dim=1)
    return hold


def latent_controls(args, store, models, infer, num_actions, world_rollout, prompts, device, render):
    """The game's keys for a latent world, fitted from each of --labels labelled training transitions
    (fit_controls, with the world's LAM: infer), and how the world follows them (following_judge, through its
    world_rollout, render its autoencoder) -> figures; the keys of the first --labels go to MODELS/controls.json, where
    play.py --controls game finds them."""
    controls, readings = {}, {}  # the fits often choose the same action for a class: its rollouts are read once
    judge = following_judge(args, store, prompts, np.random.default_rng(args.seed), device, render)
    for labels in args.labels:
        fitted = fit_controls(infer, num_actions, store, labels, args.horizon + 1, np.random.default_rng(args.seed),
                              args.batch_size, device)
        chosen = class_actions(fitted["meaning"])
        figures = judge(world_rollout, chosen, readings)
        controls[str(labels or "all")] = {"labels": fitted["labels"], "class_actions": chosen, **figures}
        if labels == args.labels[0]:
            atomic_write_text(models / "controls.json", json.dumps({"data": str(args.data), **fitted}, indent=1))
        if not figures:
            break  # no IDM: one note is enough
    first = controls[str(args.labels[0] or "all")]
    top = ("following_accuracy", "following_ceiling", "following_ceiling_decoded", "following_by_class",
           "following_ceiling_by_class", "following_ceiling_decoded_by_class", "follow_frames")
    return {"controls": controls, "key_labels": first["labels"], **{k: first.get(k) for k in top}}


def genie_samplers(dynamics_model, args):
    """The samplers a Genie world's rollouts are measured with -> {"": at --cfg_scale, "_unguided": at 1}: guidance
    moves the random-action baseline as well as the rollout, so Delta PSNR is reported both ways."""
    def at(scale):
        return dynamics.Sampler(dynamics_model, args.maskgit_steps, args.temperature, cfg_scale=scale)
    return {"": at(args.cfg_scale), **({"_unguided": at(1.0)} if args.cfg_scale != 1 else {})}


def delta_figures(results, t4):
    """Delta PSNR (the actions that led the clip minus random ones) at t = 4 and at the last step, at the evaluation's
    guidance and unguided, from results' rollout_psnr, random_action_psnr and their *_unguided rows (copied from the
    guided ones where the guidance is 1) -> the new figures."""
    figures = {}
    for suffix in ("", "_unguided"):
        for key in ("rollout_psnr", "random_action_psnr"):
            figures[key + suffix] = results.get(key + suffix) or results[key]
        rollout, shuffled = figures["rollout_psnr" + suffix], figures["random_action_psnr" + suffix]
        figures.update({"delta_psnr_t4" + suffix: rollout[t4] - shuffled[t4],
                        "delta_psnr_long" + suffix: rollout[-1] - shuffled[-1]})
    return figures


def print_delta(results, horizon, what):
    print(f"Delta PSNR            t=4: {results['delta_psnr_t4']:+.2f} dB, t={horizon}: "
          f"{results['delta_psnr_long']:+.2f} dB at guidance {results['cfg_scale']:g}; unguided "
          f"{results['delta_psnr_t4_unguided']:+.2f} / {results['delta_psnr_long_unguided']:+.2f} dB ({what})")


@torch.no_grad()
def evaluate_genie_world(args, device, models, tokenizer, dynamics_model, store):
    """A Genie world on the game's true actions (train_genie.py --actions true): its rollout under the recorded
    actions and under random ones, the copy baselines, and how it follows held actions (following_figures)."""
    from play import world_meaning
    check_game(store, dynamics_model.config, args.data)
    samplers = genie_samplers(dynamics_model, args)
    sampler = samplers[""]
    dataset = WindowDataset(store, args.horizon + 1, split="val")
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(dataset), min(args.clips, len(dataset)), replace=False)
    generator = torch.Generator(device).manual_seed(args.seed)
    sums = {k: [] for k in ("baseline_psnr", "token_copy_psnr", "tokenizer", "next_frame_ce", "tokens_changed")}
    prompts, context = [], dynamics_model.config.context
    ce_generator = torch.Generator(device).manual_seed(args.seed + 3)  # apart, so the rollouts' draws stay as they were
    for i in range(0, len(picks), args.batch_size):
        batch = [dataset[int(j)] for j in picks[i:i + args.batch_size]]
        frames = from_uint8(torch.stack([b["frames"] for b in batch]).to(device))  # (B, T, 3, 64, 64)
        actions = torch.stack([b["actions"][:-1] for b in batch]).to(device)  # (B, T - 1): the recorded ones
        prompts.append(torch.stack([b["frames"][:1] for b in batch]))
        target = frames[:, 1:]
        tokens = tokenizer.encode(frames.flatten(0, 1))  # (B * T, rows, cols)
        decoded = tokenizer.decode(tokens).unflatten(0, frames.shape[:2])
        tokens = tokens.unflatten(0, frames.shape[:2])
        sums["next_frame_ce"].append(next_frame_ce(dynamics_model, tokens[:, :context], actions[:, :context - 1],
                                                   ce_generator)[None].cpu())
        sums["tokens_changed"].append((tokens[:, 1:] != tokens[:, :-1]).float().mean((1, 2, 3)).cpu())
        shuffled = torch.randint(0, dynamics_model.config.num_actions, actions.shape, device=device,
                                 generator=generator)
        for guidance, each in samplers.items():
            for acts, key in ((actions, "rollout_psnr"), (shuffled, "random_action_psnr")):
                sums.setdefault(key + guidance, []).append(
                    psnr(rollout(tokenizer, each, frames[:, 0], acts, generator), target).cpu())
        sums["baseline_psnr"].append(psnr(frames[:, :1].expand_as(target), target).cpu())
        sums["token_copy_psnr"].append(psnr(decoded[:, :1].expand_as(target), target).cpu())
        sums["tokenizer"].append(psnr(decoded, frames).flatten().cpu())
    results = {k: torch.cat(v).mean(0).tolist() for k, v in sums.items() if k != "tokenizer"}
    results["next_frame_ce"] = dict(zip(("recorded", "random", "none"), results["next_frame_ce"]))
    t4 = min(4, args.horizon) - 1
    results.update(pipeline="genie", actions="true", game=dynamics_model.config.game, clips=len(picks),
                   horizon=args.horizon, maskgit_steps=args.maskgit_steps, temperature=args.temperature,
                   cfg_scale=args.cfg_scale,
                   tokenizer_psnr=float(torch.cat(sums["tokenizer"]).mean()), **delta_figures(results, t4),
                   action_information=results["next_frame_ce"]["random"] - results["next_frame_ce"]["recorded"])
    chosen = class_actions(world_meaning(models, dynamics_model.config))
    judge = following_judge(args, store, torch.cat(prompts), np.random.default_rng(args.seed), device,
                            through_tokenizer(tokenizer))
    results.update(judge(genie_holder(tokenizer, sampler, generator), chosen), class_actions=chosen)
    json_path = Path(args.json or "results/genie_eval.json")
    atomic_write_text(json_path, json.dumps(results, indent=1))
    print(f"held-out clips        {len(picks)} x {args.horizon + 1} frames of {args.data}; the world of "
          f"{dynamics_model.config.game}'s true actions (MaskGIT {args.maskgit_steps} steps, guidance "
          f"{args.cfg_scale:g})")
    print(f"tokenizer PSNR        {results['tokenizer_psnr']:.2f} dB; {results['tokens_changed']:.1%} of the tokens "
          f"change from one frame to the next")
    ce = results["next_frame_ce"]
    print(f"next frame's tokens   cross-entropy {ce['recorded']:.3f} nats with the recorded actions, "
          f"{ce['random']:.3f} with random ones, {ce['none']:.3f} with none: the action is worth "
          f"{results['action_information']:.3f}")
    print_delta(results, args.horizon, "recorded - random actions")
    print_following(results)
    print("horizon step          " + " ".join(f"{t:6d}" for t in range(1, args.horizon + 1)))
    for key, name in (("rollout_psnr", "rollout PSNR"), ("random_action_psnr", "random actions PSNR"),
                      ("rollout_psnr_unguided", "  unguided"), ("random_action_psnr_unguided", "  unguided, random"),
                      ("baseline_psnr", "copy-first baseline"), ("token_copy_psnr", "copy-first tokens")):
        print(f"{name:<22}" + " ".join(f"{v:6.2f}" for v in results[key]))
    print(f"wrote {json_path}")
    return results


@torch.no_grad()
def evaluate_genie(args, device):
    models = Path(args.models)
    if (models / "dynamics").exists():
        dynamics_model = load_model(dynamics.Dynamics, models / "dynamics", device)
        if dynamics_model.config.actions == "true":
            tokenizer = load_model(Tokenizer, models / "tokenizer", device)
            return evaluate_genie_world(args, device, models, tokenizer, dynamics_model, FrameStore(args.data))
    action_model = load_model(LatentActionModel, models / "lam", device)
    # A folder with only lam/ (an ablation run with --phase lam) gets the latent-action figures alone.
    tokenizer = load_model(Tokenizer, models / "tokenizer", device) if (models / "tokenizer").exists() else None
    dynamics_model = load_model(dynamics.Dynamics, models / "dynamics", device) if (models / "dynamics").exists() else None
    samplers = {} if dynamics_model is None else genie_samplers(dynamics_model, args)
    sampler = samplers.get("")
    store = FrameStore(args.data)
    if not store.has_actions:
        raise UserError(f"{args.data} has no true actions to compare the latent actions with (collect a game store)")
    dataset = WindowDataset(store, args.horizon + 1, split="val")
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(dataset), min(args.clips, len(dataset)), replace=False)
    generator = torch.Generator(device).manual_seed(args.seed)
    num_actions = action_model.config.num_actions
    names = store.action_names
    train_codes, train_true = lam_codes(action_model, WindowDataset(store, args.horizon + 1, split="train"),
                                        rng, args.clips, args.batch_size, device)
    tokenizer_psnr, codes, latent, true, val_codes, baseline_psnr, token_copy_psnr, exact, prompts = \
        ([] for _ in range(9))
    world_psnr = {}  # "rollout_psnr" (inferred actions), "random_action_psnr", each also unguided: [(B, T - 1)]
    decoder_errors, decoder_generator = [], torch.Generator(device).manual_seed(args.seed + 1)
    lam_inferred_psnr, lam_random_psnr, lam_generator = [], [], torch.Generator(device).manual_seed(args.seed + 2)
    for i in range(0, len(picks), args.batch_size):
        batch = [dataset[int(j)] for j in picks[i:i + args.batch_size]]
        frames = from_uint8(torch.stack([b["frames"] for b in batch]).to(device))  # (B, T, 3, 64, 64)
        z = action_model.encode(frames)  # (B, T - 1, C): the code before quantisation, for the probe
        actions = action_model.vq.nearest(z)  # (B, T - 1), as infer_actions
        latent.append(actions.flatten().cpu())
        prompts.append(torch.stack([b["frames"][:1] for b in batch]))
        val_codes.append(z.flatten(0, 1).float().cpu())
        true.append(torch.stack([b["actions"][:-1] for b in batch]).flatten())
        decoder_errors.append(lam_decoder_errors(action_model, frames, actions, decoder_generator))
        target = frames[:, 1:]
        baseline_psnr.append(psnr(frames[:, :1].expand_as(target), target).cpu())
        exact.append(same_frame(frames[:, :1], target).cpu())
        shuffled = torch.randint(0, num_actions, actions.shape, device=device, generator=lam_generator)
        for acts, out in ((actions, lam_inferred_psnr), (shuffled, lam_random_psnr)):
            out.append(psnr(lam_rollout(action_model, frames[:, 0], acts), target).cpu())
        if tokenizer is None:
            continue
        tokens = tokenizer.encode(frames.flatten(0, 1))  # (B * T, rows, cols)
        decoded = tokenizer.decode(tokens)
        tokenizer_psnr.append(psnr(decoded, frames.flatten(0, 1)).cpu())
        token_copy_psnr.append(psnr(decoded.unflatten(0, frames.shape[:2])[:, :1].expand_as(target), target).cpu())
        codes.append(tokens.unique().cpu())
        if dynamics_model is None:
            continue
        shuffled = torch.randint(0, dynamics_model.config.num_actions, actions.shape, device=device, generator=generator)
        for guidance, each in samplers.items():
            for acts, key in ((actions, "rollout_psnr"), (shuffled, "random_action_psnr")):
                world_psnr.setdefault(key + guidance, []).append(
                    psnr(rollout(tokenizer, each, frames[:, 0], acts, generator), target).cpu())

    latent, true = torch.cat(latent).numpy(), torch.cat(true).numpy()
    results = {"pipeline": "genie", "clips": len(picks), "horizon": args.horizon, "maskgit_steps": args.maskgit_steps,
               "temperature": args.temperature, "cfg_scale": args.cfg_scale,
               **latent_action_figures(latent, true, names, store.meta["source"], num_actions, rng),
               **lam_decoder_figures(torch.stack(decoder_errors).mean(0))}
    effect_of = effect_classes(names, store.meta["source"])[1]
    results["probe_accuracy"] = linear_probe(train_codes, effect_of[train_true], torch.cat(val_codes).numpy(),
                                             effect_of[true], len(results["effects"]))
    if tokenizer is not None:
        results["tokenizer_psnr"] = float(torch.cat(tokenizer_psnr).mean())
        results["codebook_used"] = len(torch.cat(codes).unique()) / tokenizer.config.num_codes
        token_copy = torch.cat(token_copy_psnr).mean(0)
        results["token_copy_psnr"] = token_copy.tolist()
    t4 = min(4, args.horizon) - 1
    lam_inferred, lam_shuffled, baseline = (torch.cat(x).mean(0) for x in (lam_inferred_psnr, lam_random_psnr,
                                                                            baseline_psnr))
    results.update(lam_rollout_psnr=lam_inferred.tolist(), lam_random_action_psnr=lam_shuffled.tolist(),
                   lam_delta_psnr_t4=float(lam_inferred[t4] - lam_shuffled[t4]),
                   lam_delta_psnr_long=float(lam_inferred[-1] - lam_shuffled[-1]), baseline_psnr=baseline.tolist(),
                   baseline_exact=torch.cat(exact).mean(0).tolist())
    if dynamics_model is not None:
        results.update({k: torch.cat(v).mean(0).tolist() for k, v in world_psnr.items()})
        results.update(delta_figures(results, t4))
        results.update(latent_controls(
            args, store, models, action_model.infer_actions, num_actions,
            genie_holder(tokenizer, sampler, generator), torch.cat(prompts), device,
            through_tokenizer(tokenizer)))
    table = np.zeros((len(names), num_actions), np.int64)
    np.add.at(table, (true, latent), 1)
    results["confusion"] = table.tolist()
    json_path = Path(args.json or "results/genie_eval.json")
    draw_confusion(json_path.with_name(json_path.stem + "_confusion.png"), table, names,
                   f"true action (rows) x latent action (columns), NMI {results['nmi']:.3f}")
    atomic_write_text(json_path, json.dumps(results, indent=1))
    write_meaning(models, args.data, len(latent), results["meaning"])

    print(f"held-out clips        {len(picks)} x {args.horizon + 1} frames of {args.data}")
    if tokenizer is not None:
        print(f"tokenizer PSNR        {results['tokenizer_psnr']:.2f} dB, codebook used {results['codebook_used']:.1%}")
    print(f"latent actions used   {results['lam_codes_used']} of {num_actions} (>= 2 %), perplexity "
          f"{results['lam_perplexity']:.2f}, usage " + " ".join(f"{u:.0%}" for u in results["lam_usage"]))
    print(f"NMI with true actions {results['nmi']:.3f} (chance level {results['nmi_chance']:.3f})")
    print(f"NMI with effects      {results['nmi_effect']:.3f} (chance level {results['nmi_effect_chance']:.3f}); "
          f"effect classes: {', '.join(results['effects'])}")
    print(f"mapping accuracy      effect {results['effect_accuracy']:.1%} (chance {results['effect_accuracy_chance']:.1%}"
          f", majority {results['effect_majority']:.1%}), horizontal {results['horizontal_accuracy']:.1%} (chance "
          f"{results['horizontal_accuracy_chance']:.1%}); linear probe of the effect {results['probe_accuracy']:.1%}")
    print("meaning               " + ", ".join(f"{m['action']}: {m['effect']} ({m['share']:.0%})"
                                               for m in results["meaning"]))
    print_lam_decoder(results)
    print(f"LAM decoder rollout   Delta PSNR t=4: {results['lam_delta_psnr_t4']:+.2f} dB, t={args.horizon}: "
          f"{results['lam_delta_psnr_long']:+.2f} dB")
    rows = [("LAM decoder rollout", lam_inferred), ("LAM, random actions", lam_shuffled)]
    if dynamics_model is not None:
        print_delta(results, args.horizon, f"inferred - random actions; MaskGIT {args.maskgit_steps} steps, "
                                           f"temperature {args.temperature:g}")
        rows += [(name, torch.tensor(results[key])) for key, name in (
            ("rollout_psnr", "rollout PSNR"), ("random_action_psnr", "random actions PSNR"),
            ("rollout_psnr_unguided", "  unguided"), ("random_action_psnr_unguided", "  unguided, random"))]
    print("horizon step          " + " ".join(f"{t:6d}" for t in range(1, args.horizon + 1)))
    rows.append(("copy-first baseline", baseline))
    if tokenizer is not None:
        rows.append(("copy-first tokens", token_copy))
    for name, values in rows:
        print(f"{name:<22}" + " ".join(f"{v:6.2f}" for v in values.tolist()))
    print(f"{'prompt frame again':<22}" + " ".join(f"{v:6.0%}" for v in results["baseline_exact"]) +
          " of the clips (copying scores 100 dB there)")
    print_following(results)
    print(f"wrote {json_path}, {json_path.with_name(json_path.stem + '_confusion.png')} and {models / 'meaning.json'}")
    return results


@torch.no_grad()
def evaluate_vae(args, device):
    vae = load_model(ViTVAE, args.vae, device)
    c = vae.config
    store = open_frames(args.data, size=(c.width, c.height))
    require_size(store, c.width, c.height)
    picked = spread_frames(store, "val", args.frames)
    if len(picked) == 0:
        raise UserError(f"{store.path} has no held-out frames (its 'val' split is empty)")
    psnrs, ssims = [], []
    for i in range(0, len(picked), args.batch_size):
        frames = torch.stack([store.window(int(j), 1)["frames"][0] for j in picked[i:i + args.batch_size]])
        frames = from_uint8(frames.to(device))  # (B, 3, H, W)
        recon = vae.decode(vae.encode(frames)[0])
        psnrs.append(psnr(recon, frames).cpu())
        ssims.append(ssim(recon, frames).cpu())
    results = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()), "frames": len(picked),
               "vae": str(args.vae), "data": str(store.path)}
    json_path = Path(args.json or "results/vae_eval.json")
    atomic_write_text(json_path, json.dumps(results, indent=1))
    print(f"{'VAE':<12} {'frames':>7} {'PSNR (dB)':>10} {'SSIM':>7}")
    print(f"{Path(args.vae).name:<12} {len(picked):>7} {results['psnr']:>10.2f} {results['ssim']:>7.4f}")
    print(f"wrote {json_path}")
    return results


@dataclass
class IDMConfig:
    effects: list             # the effect classes it reads (effect_classes), in order
    horizontal: list          # each effect's horizontal direction: 0 left, 1 none, 2 right
    game: str = ""            # the store's source it was trained on
    width: int = 64
    height: int = 64          # taller frames are shrunk to this height first (area), so 320x180 reads as cheaply


class InverseDynamics(nn.Module, PyTorchModelHubMixin):
    """Frames t and t + 1 (B, 3, H, W) each -> logits over the effect classes (B, classes): four stride-2
    convolutions, then a small MLP; any frame size works (frames taller than config.height are shrunk to it, and the
    pooling fixes the grid at 4x4). Trained on real frames
    with their true actions (evaluate.py idm), it is the reader of what a transition shows: the ceiling of the latent
    actions, and the judge of whether a world follows the actions it is given (following_figures)."""

    def __init__(self, config: IDMConfig):
        super().__init__()
        self.config, w = config, config.width

        def down(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.GELU()]
        self.net = nn.Sequential(*down(6, w), *down(w, 2 * w), *down(2 * w, 2 * w), *down(2 * w, 2 * w),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * w * 16, 4 * w), nn.GELU(),
                                 nn.Linear(4 * w, len(config.effects)))

    def shrink(self, frames):
        """frames (..., C, H, W) -> as float, shrunk (area) to config.height when taller."""
        frames = frames.float()
        if frames.shape[-2] <= self.config.height:
            return frames
        return F.interpolate(frames.flatten(0, -4), scale_factor=self.config.height / frames.shape[-2],
                             mode="area").unflatten(0, frames.shape[:-3])

    def forward(self, before, after):
        pair = self.shrink(torch.cat([before, after], dim=1))
        # channels last: the layout oneDNN's and cuDNN's fast bf16 convolutions want (1.4x a step on an AMX CPU)
        return self.net(pair.contiguous(memory_format=torch.channels_last))

    def horizontal(self, before, after):  # -> (B,) 0 left, 1 none, 2 right
        return torch.as_tensor(self.config.horizontal, device=before.device)[self(before, after).argmax(1)]


def idm_folder(store_path):
    """Where evaluate.py idm leaves the inverse dynamics model of a store: beside it, <store>_idm."""
    return Path(store_path).parent / f"{Path(store_path).name}_idm"


def evaluate_idm(args, device):
    store = FrameStore(args.data)
    if not store.has_actions:
        raise UserError(f"{args.data} has no true actions to read off the frames (collect a game store)")
    names = store.action_names
    effects, effect_of, horizontal_of = effect_classes(names, store.meta["source"])
    horizontal_of_effect = np.zeros(len(effects), np.int64)
    horizontal_of_effect[effect_of] = horizontal_of  # every action of an effect class has its direction
    train, val = (WindowDataset(store, 2, split=split) for split in ("train", "val"))
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"{store.path} needs transitions on training and on held-out levels (its 'train' split has "
                        f"{len(train)}, its 'val' split {len(val)})")

    model = InverseDynamics(IDMConfig(effects, horizontal_of_effect.tolist(), store.meta["source"]))
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    starts = train.starts[rng.integers(0, len(train), (args.steps, args.batch_size))]  # every step's transitions
    held_out = val.starts[rng.choice(len(val), min(args.transitions, len(val)), replace=False)]
    # The frames they use are read and shrunk to the IDM's input once, not at every step: reading and shrinking two
    # 320x180 frames per sample took longer than the step itself. They are held as uint8, at most two per sample drawn
    # (by default 192,000 frames, 2.4 GB at 64x64, and the held-out ones) and never more than the store has.
    used = np.unique(np.concatenate([starts.ravel(), held_out]) + np.array([[0], [1]]))
    row = np.zeros(store.count, np.int64)
    row[used] = np.arange(len(used))
    shrunk = np.concatenate([to_uint8(model.shrink(from_uint8(torch.from_numpy(store.frames[used[i:i + 256]])
                                                              .permute(0, 3, 1, 2))))
                             for i in range(0, len(used), 256)])  # (U, h, w, C)
    actions = np.asarray(store.actions)

    def batch(transitions):  # their frames t and t + 1, shrunk (B, 2, 3, h, w) floats, and effect classes (B,)
        pairs = shrunk[row[np.stack([transitions, transitions + 1], 1)]]  # (B, 2, h, w, C)
        return (from_uint8(torch.from_numpy(pairs).to(device).permute(0, 1, 4, 2, 3)),
                torch.as_tensor(effect_of[actions[transitions]], device=device))
    for step in tqdm(range(args.steps), desc="inverse dynamics", leave=False):
        frames, effect = batch(starts[step])
        with autocast(device):
            loss = F.cross_entropy(model(frames[:, 0], frames[:, 1]).float(), effect)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    # Besides each pair as it happened, the later frame twice and the pair reversed: what the IDM reads without
    # motion, and whether the order of the frames matters to it (motion reversed is the opposite direction).
    views = {"": lambda f: (f[:, 0], f[:, 1]), "_one_frame": lambda f: (f[:, 1], f[:, 1]),
             "_reversed": lambda f: (f[:, 1], f[:, 0])}
    predicted, true = {view: [] for view in views}, []
    with torch.no_grad(), autocast(device):
        for i in range(0, len(held_out), args.batch_size):
            frames, effect = batch(held_out[i:i + args.batch_size])
            for view, pair in views.items():
                predicted[view].append(model(*pair(frames)).argmax(1).cpu())
            true.append(effect.cpu())
    predicted, true = {view: torch.cat(p).numpy() for view, p in predicted.items()}, torch.cat(true).numpy()
    results = {"steps": args.steps, "transitions": len(true), "effects": effects,
               "effect_accuracy": float((predicted[""] == true).mean()),
               **{"horizontal_accuracy" + view: float((horizontal_of_effect[p] == horizontal_of_effect[true]).mean())
                  for view, p in predicted.items()},
               "horizontal_none_share": float((horizontal_of_effect[true] == 1).mean()),
               "nmi_effect": normalised_mutual_information(true, predicted[""]),
               "effect_majority": float(np.bincount(true).max() / len(true))}
    json_path, out = Path(args.json or "results/idm_eval.json"), Path(args.out or idm_folder(store.path))
    atomic_write_text(json_path, json.dumps(results, indent=1))
    save_model(model, out)
    print(f"inverse dynamics from two frames, {args.steps} steps, {len(true)} held-out transitions: effect accuracy "
          f"{results['effect_accuracy']:.1%} (majority {results['effect_majority']:.1%}), horizontal "
          f"{results['horizontal_accuracy']:.1%}, NMI with the effects {results['nmi_effect']:.3f}")
    print(f"the same transitions' horizontal class read from the later frame alone: "
          f"{results['horizontal_accuracy_one_frame']:.1%}; from the pair reversed: "
          f"{results['horizontal_accuracy_reversed']:.1%} (a reader of motion alone: about the share with no horizontal "
          f"action, {results['horizontal_none_share']:.1%})")
    print(f"wrote {json_path} and the model {out} (evaluate.py genie and dit read the worlds' frames with it)")
    return results


HORIZONTAL = ("left", "none", "right")


def read_horizontal(idm, clips):
    """The IDM's horizontal class of each transition of clips (B, L + 1, 3, H, W) floats in [-1, 1] -> (B, L)."""
    return idm.horizontal(clips[:, :-1].flatten(0, 1), clips[:, 1:].flatten(0, 1)).view(len(clips), -1)


@torch.no_grad()
def following_figures(idm, world_rollout, chosen, prompts, batch_size, readings=None):
    """How well a world follows the actions it is given, read off its frames by the IDM (trained on real frames):
    from each prompt, each horizontal class (left, none, right) is held for the clip's length through the world's
    action for it, and the IDM names the class each generated transition shows.

    idm: InverseDynamics; world_rollout(prompt clips (B, P, 3, H, W) in [-1, 1], action (int)) -> the clip it made
    (B, L + 1, 3, H, W): the last prompt frame then L generated ones; chosen: {class: the world's action for it}, a
    class without one follows none of its transitions (0); prompts: held-out clips (N, P, 3, H, W) uint8 whose last
    frame is the one the world continues; readings: {action: the IDM's classes of its rollouts (N, L)}, kept across
    calls on the same prompts (a latent world's key fits often choose the same action). -> following_accuracy (mean
    over the classes of the share of generated transitions read as the class held) and following_by_class."""
    device = next(idm.parameters()).device
    readings = {} if readings is None else readings
    generated = {}
    for c, name in enumerate(HORIZONTAL):
        if c not in chosen:
            generated[name] = 0.0
            continue
        if chosen[c] not in readings:
            readings[chosen[c]] = torch.cat([
                read_horizontal(idm, world_rollout(from_uint8(prompts[i:i + batch_size].to(device)), chosen[c]).float())
                for i in range(0, len(prompts), batch_size)])
        generated[name] = (readings[chosen[c]] == c).float().mean().item()
    return {"following_accuracy": float(np.mean(list(generated.values()))), "following_by_class": generated}


@torch.no_grad()
def following_ceiling_figures(idm, held, batch_size, render=None):
    """What following_figures can be compared with: the same reading of real held-out clips, held: {class: (M, L + 1,
    3, H, W) uint8 during which the true actions all had that class}; render(clips (B, L + 1, 3, H, W) floats) -> the
    same clips as a world renders them (through its tokenizer or VAE), or None. -> following_ceiling (the real
    clips), following_ceiling_decoded (the real clips through render: what the world's own autoencoder leaves the IDM
    to read, so the most such a world can score), and their per-class figures."""
    device = next(idm.parameters()).device
    ceiling, decoded = {}, {}
    for c, name in enumerate(HORIZONTAL):
        clips = held.get(c, [])
        for out, view in ((ceiling, lambda x: x), (decoded, render)):
            if len(clips) and view is not None:
                out[name] = float(np.mean([(read_horizontal(idm, view(from_uint8(clips[i:i + batch_size].to(device)))
                                                            .float()) == c).float().mean().item()
                                           for i in range(0, len(clips), batch_size)]))
    return {"following_ceiling": float(np.mean(list(ceiling.values()))) if ceiling else None,
            "following_ceiling_decoded": float(np.mean(list(decoded.values()))) if decoded else None,
            "following_ceiling_by_class": ceiling, "following_ceiling_decoded_by_class": decoded}


def held_clips(store, length, names, count, rng):
    """Real held-out clips of `length` frames during whose transitions the true action's horizontal class stayed the
    same -> {class: (M, length, 3, H, W) uint8}, at most `count` of each, picked by rng."""
    horizontal = effect_classes(names, store.meta["source"])[2]
    dataset = WindowDataset(store, length, split="val")
    actions = np.asarray(store.actions)
    found = {c: [] for c in range(len(HORIZONTAL))}
    for start in rng.permutation(dataset.starts):
        classes = set(horizontal[actions[start:start + length - 1]].tolist())
        if len(classes) == 1 and len(found[c := classes.pop()]) < count:
            found[c].append(start)
    return {c: torch.stack([store.window(int(s), length)["frames"] for s in starts])
            for c, starts in found.items() if starts}


def print_following(results):
    """The following figures of an evaluation: one line for a world of the game's actions, one per --labels count for
    a latent world's fitted keys."""
    sets = {f"keys from {f['labels']} labels": f for f in results.get("controls", {}).values()} or \
        {"the game's own actions": results}
    for name, figures in sets.items():
        if figures.get("following_accuracy") is not None:
            print(f"following, {name}: {figures['following_accuracy']:.1%} of the transitions read as the class held "
                  f"(ceiling, real clips: {figures['following_ceiling']:.1%}; through the world's autoencoder: "
                  f"{figures['following_ceiling_decoded']:.1%}); " + ", ".join(
                      f"{k} {v:.0%}" for k, v in figures["following_by_class"].items()))


def class_actions(meaning):
    """A world's action for each horizontal class (left, none, right), from what its actions mean (play.py's key
    map: ArrowLeft, ArrowDown for none, ArrowRight) -> {class: action}; a class without one is left out."""
    from play import default_keymap
    keymap = default_keymap(meaning)
    chosen = {c: keymap[key] for c, key in enumerate(("ArrowLeft", "ArrowDown", "ArrowRight"))}
    return {c: a for c, a in chosen.items() if a >= 0}


def draw_curves(path, curves, title, xlabel="horizon step", ylabel="PSNR (dB)", log_y=False):
    """A line plot of named curves {name: (x values, y values)}, drawn with OpenCV and written as PNG; log_y draws
    the y axis in decades (losses)."""
    width, height, left, bottom, top = 640, 400, 60, 40, 40
    curves = {name: (np.asarray(x, float), np.log10(y) if log_y else np.asarray(y, float))
              for name, (x, y) in curves.items()}
    xs, ys = (np.concatenate([c[i] for c in curves.values()]) for i in (0, 1))
    pad = 0.1 if log_y else 1
    low, high = np.floor(ys.min() / pad) * pad - pad, np.ceil(ys.max() / pad) * pad + pad
    first, last = xs.min(), max(xs.max(), xs.min() + 1)
    image = np.full((height, width, 3), 255, np.uint8)

    def point(x, y):
        return (int(left + (width - left - 20) * (x - first) / (last - first)),
                int(top + (height - top - bottom) * (high - y) / (high - low)))

    cv2.rectangle(image, (left, top), (width - 20, height - bottom), (0, 0, 0), 1)
    for y in np.linspace(low, high, 5):
        label = f"{10 ** y:.3g}" if log_y else f"{y:.1f}"
        cv2.putText(image, label, (5, point(first, y)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for x in (first, last):
        cv2.putText(image, f"{x:g}", (point(x, low)[0] - 10, height - bottom + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1)
    cv2.putText(image, f"{title}: {ylabel} against {xlabel}", (left, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    colours = [(200, 60, 30), (30, 30, 200), (40, 150, 40), (120, 120, 120), (160, 60, 160), (200, 140, 0)]
    for k, (name, (x, y)) in enumerate(curves.items()):
        colour = colours[k % len(colours)]
        cv2.polylines(image, [np.array([point(a, b) for a, b in zip(x, y)], np.int32)], False, colour, 2)
        cv2.putText(image, name[-30:], (width - 240, top + 20 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), image[..., ::-1])


def plot_logs(args):
    """Training curves: `key` of each log (logs/*.json, written by every training script) against the step."""
    names = [Path(log).stem for log in args.logs]
    if len(set(names)) < len(names):  # the same phase of several runs: name each by its run's folder too
        names = [f"{Path(log).resolve().parent.parent.name}/{Path(log).stem}" for log in args.logs]
    curves = {}
    for name, log in zip(names, args.logs):
        try:
            history = json.loads(Path(log).read_text())
            points = [(h["step"], h[args.key]) for h in history if isinstance(h.get(args.key), (int, float))]
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            raise UserError(f"{log} is not a training log (logs/*.json of a training script)") from None
        if not points:
            raise UserError(f"{log} logs no {args.key!r}; it logs {', '.join(history[0]) if history else 'nothing'}")
        curves[name] = ([s for s, _ in points], [max(v, 1e-12) for _, v in points])
    draw_curves(args.out, curves, "training", "step", args.key, log_y=True)
    print(f"wrote {args.out}")


@torch.no_grad()
def evaluate_dit(args, device):
    vae, model, action_model = load_world(args.models, device)
    conditioned = model.config.num_actions > 0
    true_actions = conditioned and model.config.actions == "true"
    if conditioned and not true_actions and action_model is None:
        raise UserError(f"{args.models}/dit takes latent actions: put the LAM it was trained with (train_dit.py --lam) "
                        f"in {Path(args.models) / 'lam'} to evaluate it")
    c = vae.config
    store = open_frames(args.data, size=(c.width, c.height))
    require_size(store, c.width, c.height)
    check_game(store, model.config, args.data)
    windows = WindowDataset(store, args.prompt_frames + args.horizon, split="val")
    picks = np.linspace(0, len(windows) - 1, min(args.clips, len(windows))).round().astype(int)
    generator = torch.Generator(device).manual_seed(args.seed)
    scale = model.config.latent_scale
    sampler = dit.Sampler(model, args.steps, args.context_t, cfg_scale=args.cfg_scale)
    # guidance moves the random-action baseline as well as the rollout: Delta PSNR is reported unguided too
    unguided = dit.Sampler(model, args.steps, args.context_t, cfg_scale=1.0) if args.cfg_scale != 1 else None
    keys = ["psnr", "ssim", "baseline_psnr", "baseline_ssim", "recon_psnr", "latent_copy_psnr", "baseline_exact"] + \
        ["best_of_k_psnr"] * (args.samples > 1) + ["random_action_psnr"] * conditioned + \
        ["rollout_psnr_unguided", "random_action_psnr_unguided"] * (conditioned and unguided is not None)
    sums = {k: torch.zeros(args.horizon) for k in keys}
    latent, true, prompts = [], [], []  # the LAM's actions of the clips' transitions, the store's true ones; prompts
    decoder_errors, decoder_generator = [], torch.Generator(device).manual_seed(args.seed + 1)

    def continue_clips(context, actions, with_sampler=sampler):  # -> decoded continuations (B, H, 3, h, w)
        generated = with_sampler.rollout(context, args.horizon, generator, actions) / scale
        return vae.decode(generated.flatten(0, 1)).float().unflatten(0, (len(context), args.horizon))

    for chunk in tqdm(np.array_split(picks, max(1, len(picks) // args.batch_size)), desc="evaluate dit"):
        clips = [windows[int(i)] for i in chunk]
        frames = from_uint8(torch.stack([clip["frames"] for clip in clips]).to(device))  # (B, P + H, 3, h, w)
        prompt, truth = frames[:, :args.prompt_frames], frames[:, args.prompt_frames:]
        prompts.append(torch.stack([clip["frames"][:args.prompt_frames] for clip in clips]))
        draws, means = encode_clips(vae, model, frames, generator)  # (B, P + H, N, C) each
        context = draws[:, :args.prompt_frames]
        if true_actions:  # the recorded actions: actions[:, k] was taken at frame k
            led_to = model.led_to(torch.stack([clip["actions"] for clip in clips]).to(device))  # (B, P + H)
        else:
            led_to = inferred_actions(action_model, model, means) if conditioned else None
        samples = []  # K continuations of the same context: (B, H) PSNRs each; the first is the reported one
        for k in range(args.samples):
            decoded = continue_clips(context, led_to)
            if k == 0:
                first = decoded
            samples.append(psnr(decoded, truth).cpu())
        if conditioned:  # the same prompt, led on by random actions: what the actions are worth
            shuffled = led_to.clone()
            shuffled[:, args.prompt_frames:] = torch.randint(0, model.config.num_actions, truth.shape[:2],
                                                             device=device, generator=generator)
            sums["random_action_psnr"] += psnr(continue_clips(context, shuffled), truth).sum(0).cpu()
            if unguided is not None:
                for acts, key in ((led_to, "rollout_psnr_unguided"), (shuffled, "random_action_psnr_unguided")):
                    sums[key] += psnr(continue_clips(context, acts, unguided), truth).sum(0).cpu()
        if conditioned and not true_actions:
            latent.append(led_to[:, 1:].flatten().cpu())
            first_clip = means[:, :model.config.lam_clip_len]  # one clip of the length the LAM labels
            decoder_errors.append(lam_decoder_errors(action_model, first_clip, led_to[:, 1:first_clip.shape[1]],
                                                     decoder_generator))
            if store.has_actions:  # actions[:, k] was taken at frame k: the transition to frame k + 1
                true.append(torch.stack([clip["actions"][:-1] for clip in clips]).flatten())
        recon = vae.decode((means[:, args.prompt_frames:] / scale).flatten(0, 1)).float().unflatten(0, truth.shape[:2])
        latent_copy = vae.decode(means[:, args.prompt_frames - 1] / scale).float()[:, None].expand_as(truth)
        last = prompt[:, -1:].expand_as(truth)  # the baseline: nothing moves after the prompt
        sums["psnr"] += samples[0].sum(0)
        sums["ssim"] += ssim(first, truth).sum(0).cpu()
        if args.samples > 1:
            sums["best_of_k_psnr"] += torch.stack(samples).amax(0).sum(0)
        sums["baseline_psnr"] += psnr(last, truth).sum(0).cpu()
        sums["baseline_ssim"] += ssim(last, truth).sum(0).cpu()
        sums["recon_psnr"] += psnr(recon, truth).sum(0).cpu()
        sums["latent_copy_psnr"] += psnr(latent_copy, truth).sum(0).cpu()
        sums["baseline_exact"] += same_frame(last, truth).sum(0).cpu()
    result = {k: [round(float(v), 4) for v in s / len(picks)] for k, s in sums.items()}
    result.update(pipeline="dit", clips=len(picks), samples=args.samples, horizon=args.horizon, prompt_frames=args.prompt_frames,
                  steps=args.steps, context_t=args.context_t, cfg_scale=args.cfg_scale, models=str(args.models),
                  data=str(args.data))
    t4 = min(4, args.horizon) - 1
    if conditioned:
        result.update(rollout_psnr=result["psnr"], actions=model.config.actions)
        result.update(delta_figures(result, t4))
    if conditioned and not true_actions:
        latent = torch.cat(latent).numpy()
        usage = np.bincount(latent, minlength=model.config.num_actions) / len(latent)
        result.update(lam_usage=usage.tolist(), lam_codes_used=int((usage >= 0.02).sum()),
                      **lam_decoder_figures(torch.stack(decoder_errors).mean(0)))
        if true:
            names = store.action_names
            result.update(latent_action_figures(latent, torch.cat(true).numpy(), names, store.meta["source"],
                                                model.config.num_actions, np.random.default_rng(args.seed)))
    if true_actions:
        from play import world_meaning
        chosen = class_actions(world_meaning(args.models, model.config))
        judge = following_judge(args, store, torch.cat(prompts), np.random.default_rng(args.seed), device,
                                through_vae(vae))
        result.update(judge(dit_holder(vae, model, sampler, generator), chosen), class_actions=chosen)
    elif conditioned:
        def infer(frames):  # clips (B, T, 3, H, W) -> the LAM's actions of their transitions (B, T - 1)
            return inferred_actions(action_model, model, encode_clips(vae, model, frames, generator)[1])[:, 1:]
        result.update(latent_controls(args, store, Path(args.models), infer, model.config.num_actions,
                                      dit_holder(vae, model, sampler, generator),
                                      torch.cat(prompts), device, through_vae(vae)))
    json_path = Path(args.json or "results/dit_eval.json")
    atomic_write_text(json_path, json.dumps(result, indent=1))
    if "meaning" in result:
        write_meaning(Path(args.models), args.data, len(latent), result["meaning"])
    plot = json_path.with_suffix(".png")
    steps = range(1, args.horizon + 1)
    curves = {"DiT" + (", recorded actions" if true_actions else ", inferred actions" if conditioned else ""):
              (steps, result["psnr"]),
              "copy last prompt frame": (steps, result["baseline_psnr"]),
              "VAE reconstruction": (steps, result["recon_psnr"]),
              "copy last prompt latent": (steps, result["latent_copy_psnr"])}
    if conditioned:
        curves["DiT, random actions"] = (steps, result["random_action_psnr"])
    if args.samples > 1:
        curves[f"DiT, best of {args.samples}"] = (steps, result["best_of_k_psnr"])
    draw_curves(plot, curves, "held-out continuation")
    print(f"{len(picks)} held-out clips, {args.prompt_frames} prompt frames, horizon {args.horizon}")
    columns = [("psnr", "psnr"), ("ssim", "ssim"), ("baseline_psnr", "copy psnr"), ("baseline_ssim", "copy ssim"),
               ("recon_psnr", "vae psnr"), ("latent_copy_psnr", "copy latent"), ("baseline_exact", "same frame")] + \
        [("random_action_psnr", "random actions")] * conditioned + \
        [("best_of_k_psnr", f"best of {args.samples}")] * (args.samples > 1)
    print("  step " + " ".join(f"{name:>{max(7, len(name))}}" for _, name in columns))
    for h in range(args.horizon):
        print(f"  {h + 1:4d} " + " ".join(f"{result[key][h]:{max(7, len(name))}.{3 if 'ssim' in key else 2}f}"
                                          for key, name in columns))
    if true_actions:
        print_delta(result, args.horizon, "recorded - random true actions")
    elif conditioned:
        print_delta(result, args.horizon, "inferred - random latent actions")
        print(f"latent actions used   {result['lam_codes_used']} of {model.config.num_actions}")
        print_lam_decoder(result)
    if "meaning" in result:
        print(f"NMI with true actions {result['nmi']:.3f} (chance {result['nmi_chance']:.3f}), with effects "
              f"{result['nmi_effect']:.3f} (chance {result['nmi_effect_chance']:.3f}); effect accuracy "
              f"{result['effect_accuracy']:.1%} (majority {result['effect_majority']:.1%})")
        print("meaning " + ", ".join(f"{m['action']}: {m['effect']} ({m['share']:.0%})" for m in result["meaning"]))
    print_following(result)
    print(f"wrote {json_path} and {plot}" + (f" and {Path(args.models) / 'meaning.json'}" if "meaning" in result else ""))
    return result


CONTROLS_GIF_FRAMES = 12  # frames each key is held for in controls_play.gif


def world_summary(results):
    """The control figures of one world from its evaluate.py genie or dit JSON -> one controls_eval.json entry."""
    pipeline = results["pipeline"]
    entry = {"pipeline": pipeline, "actions": results.get("actions", "latent"), "cfg_scale": results["cfg_scale"],
             **{k: results.get(k) for k in ("following_accuracy", "following_ceiling", "following_ceiling_decoded",
                                            "following_by_class",
                                            "delta_psnr_t4", "delta_psnr_t4_unguided", "rollout_psnr")},
             # what a world that changes nothing scores through its own autoencoder: the copy a rollout must beat
             "copy_psnr": results["token_copy_psnr" if pipeline == "genie" else "latent_copy_psnr"],
             "copy_frame_psnr": results["baseline_psnr"]}
    if entry["actions"] == "latent":
        entry.update(labels=results.get("key_labels"), following_by_labels={
            str(f["labels"]): f.get("following_accuracy") for f in results.get("controls", {}).values()})
    return entry


def evaluate_controls(args, device):
    """controls_eval.json: the control figures of each world (world_summary of its evaluate.py JSON), each against its
    ceiling and a latent world against its pipeline's true-action world; and controls_play.gif."""
    worlds = {}
    for pair in args.worlds:
        name, _, path = pair.partition("=")
        if not name or not Path(path).is_file():
            raise UserError(f"{pair}: give each world as NAME=JSON, the file evaluate.py genie or dit wrote for it")
        try:
            worlds[name] = world_summary(json.loads(Path(path).read_text()))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a JSON that evaluate.py genie or dit wrote (rerun the evaluation with "
                            f"this evaluate.py)") from None
    true_world = {w["pipeline"]: w for w in worlds.values() if w["actions"] == "true"}
    for w in worlds.values():
        if w["following_accuracy"] is not None and w["following_ceiling"]:
            w["following_of_ceiling"] = w["following_accuracy"] / w["following_ceiling"]
        if w["actions"] == "latent" and (true_w := true_world.get(w["pipeline"])) and true_w["following_accuracy"]:
            w["following_of_true_world"] = w["following_accuracy"] / true_w["following_accuracy"]
    json_path = Path(args.json)
    atomic_write_text(json_path, json.dumps(worlds, indent=1))
    print(f"{'world':<16}{'actions':>8}{'following':>11}{'ceiling':>9}{'decoded':>9}{'Delta t=4':>11}{'unguided':>10}"
          f"{'rollout t=last':>16}{'copy':>8}")
    for name, w in worlds.items():
        follow, ceiling, decoded = ("-" if w[k] is None else f"{w[k]:.1%}" for k in (
            "following_accuracy", "following_ceiling", "following_ceiling_decoded"))
        print(f"{name:<16}{w['actions']:>8}{follow:>11}{ceiling:>9}{decoded:>9}{w['delta_psnr_t4']:>+10.2f} "
              f"{w['delta_psnr_t4_unguided']:>+9.2f} {w['rollout_psnr'][-1]:>15.2f} {w['copy_psnr'][-1]:>7.2f}")
    print(f"wrote {json_path}")
    if args.gif_models:
        controls_gif(args, device)


@torch.no_grad()
def controls_gif(args, device):
    """One held-out prompt, "right" held beside "left" held, in each of the --gif_models Genie worlds (a latent
    world through the keys evaluate.py genie --labels fitted, controls.json) -> --gif, rows the worlds."""
    from play import world_meaning
    store = FrameStore(args.data)
    dataset = WindowDataset(store, 1, split="val")
    prompt = from_uint8(dataset[int(np.random.default_rng(args.seed).integers(len(dataset)))]["frames"].to(device))
    rows = []
    for folder in args.gif_models:
        tokenizer = load_model(Tokenizer, Path(folder) / "tokenizer", device)
        model = load_model(dynamics.Dynamics, Path(folder) / "dynamics", device)
        check_game(store, model.config, args.data)
        chosen = class_actions(world_meaning(folder, model.config, controls="game"))
        sampler = dynamics.Sampler(model, temperature=0.0)
        row = []
        for c, key in ((2, "right"), (0, "left")):
            if c not in chosen:
                raise UserError(f"{folder} has no action for '{key}' (its keys: {chosen})")
            actions = torch.full((1, CONTROLS_GIF_FRAMES), chosen[c], device=device)
            frames = torch.cat([prompt, rollout(tokenizer, sampler, prompt, actions,
                                                torch.Generator(device).manual_seed(args.seed))[0]])
            row.append(labelled(to_uint8(frames), f"{Path(folder).name} {model.config.actions}: {key}"))
        rows.append(np.concatenate(row, axis=2))
    write_gif(args.gif, np.concatenate(rows, axis=1), store.fps / 2)
    print(f"wrote {args.gif}: {' / '.join(args.gif_models)} (rows), right and left held (columns)")


def labelled(frames, text):
    """uint8 frames (T, H, W, 3) -> enlarged as play.py shows them, with text on each."""
    from play import enlarge
    big = np.ascontiguousarray(enlarge(frames))
    for f in big:
        cv2.putText(f, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return big


def main():
    parser = argparse.ArgumentParser(description="Evaluate trained world models on held-out data.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("genie", help="tokenizer, latent actions (vs the true actions) and dynamics rollouts")
    p.add_argument("data", help="frame store with true actions, e.g. videos/coinrun (its held-out levels are used)")
    p.add_argument("--models", default="models/genie", help="folder written by train_genie.py")
    p.add_argument("--clips", type=positive(int), default=128, help="held-out clips to evaluate (default 128)")
    p.add_argument("--horizon", type=positive(int), default=16, help="frames generated per clip (default 16)")
    p.add_argument("--batch_size", type=positive(int), default=32, help="clips per batch (default 32)")
    p.add_argument("--maskgit_steps", type=positive(int), default=8, help="decoding steps per frame (default 8)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the tokens (default 0: the most likely ones; 1 samples the model)")
    p.add_argument("--cfg_scale", type=float, default=dynamics.CFG_SCALE,
                   help=f"classifier-free guidance of the latent actions, 1 = none (default {dynamics.CFG_SCALE:g})")
    p.add_argument("--json", help="where to write the figures (default results/genie_eval.json)")
    p.add_argument("--idm", help="the inverse dynamics model that reads the world's frames for the following figure "
                                 "(default: DATA_idm, made by evaluate.py idm DATA)")
    p.add_argument("--labels", type=int, nargs="+", default=[1000, 100, 0],
                   help="a latent world: the game's keys are fitted from this many labelled transitions of the "
                        "training levels, each count in turn (0: all of them), and the world's following figure "
                        "measured through them; the first count's keys go to MODELS/controls.json for play.py "
                        "--controls game (default 1000 100 0)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_precision_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the clip choice and the sampling")
    p = sub.add_parser("vae", help="reconstruction PSNR and SSIM of the ViT-VAE on held-out frames")
    p.add_argument("data", help="frame store of 320x180 frames or a video (its held-out split is used)")
    p.add_argument("--vae", default="models/vae2", help="the ViT-VAE model folder (default models/vae2)")
    p.add_argument("--frames", type=positive(int), default=512,
                   help="held-out frames, spread evenly over the split (default 512)")
    p.add_argument("--batch_size", type=positive(int), default=32, help="frames per batch (default 32)")
    p.add_argument("--json", help="where to write the figures (default results/vae_eval.json)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_precision_flag(p)
    p = sub.add_parser("dit", help="continuations of held-out clips by the diffusion world model vs copying a frame")
    p.add_argument("data", help="frame store of 320x180 frames or a video (its held-out split is used)")
    p.add_argument("--models", default="models/", help="folder (or hub repo id) with vae2/ and dit/")
    p.add_argument("--clips", type=positive(int), default=64, help="held-out clips, spread evenly (default 64)")
    p.add_argument("--prompt_frames", type=positive(int), default=16, help="frames of prompt per clip (default 16)")
    p.add_argument("--horizon", type=positive(int), default=16, help="frames generated per clip (default 16)")
    p.add_argument("--steps", type=positive(int), default=10, help="Euler steps per frame (default 10)")
    p.add_argument("--context_t", type=float, default=0.95, help="flow time of the context frames (default 0.95)")
    p.add_argument("--cfg_scale", type=float, default=CFG_SCALE,
                   help=f"a DiT with latent actions: their classifier-free guidance (default {CFG_SCALE:g})")
    p.add_argument("--samples", type=positive(int), default=1,
                   help="continuations per clip; K > 1 adds best_of_k_psnr, the best of K per clip (default 1)")
    p.add_argument("--batch_size", type=positive(int), default=8, help="clips per batch (default 8)")
    p.add_argument("--json", help="where to write the figures (default results/dit_eval.json; the plot beside it)")
    p.add_argument("--idm", help="the inverse dynamics model that reads the world's frames for the following figure "
                                 "(default: DATA_idm, made by evaluate.py idm DATA)")
    p.add_argument("--labels", type=int, nargs="+", default=[1000, 100, 0],
                   help="a latent world: the counts of labelled transitions the game's keys are fitted from, as for "
                        "genie (default 1000 100 0)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_precision_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt posterior samples and the noise")
    p = sub.add_parser("idm", help="how much of the true actions two frames show: the ceiling for the latent actions")
    p.add_argument("data", help="frame store with true actions, e.g. videos/coinrun (trained on its training levels, "
                                "scored on the held-out ones)")
    p.add_argument("--steps", type=positive(int), default=1500,
                   help="training steps (default 1500: about 1.5 min on 2 CPU cores in bf16 at 64x64)")
    p.add_argument("--batch_size", type=positive(int), default=64, help="transitions per step (default 64)")
    p.add_argument("--lr", type=positive(float), default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--transitions", type=positive(int), default=2048,
                   help="held-out transitions to score (default 2048)")
    p.add_argument("--json", help="where to write the figures (default results/idm_eval.json)")
    p.add_argument("--out", help="where to save the model, which genie and dit use to read the worlds' frames "
                                 "(default: beside DATA, DATA_idm)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_precision_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    p = sub.add_parser("controls", help="the control figures of several worlds side by side, and a GIF of held keys")
    p.add_argument("worlds", nargs="+", metavar="NAME=JSON",
                   help="each world's figures, as evaluate.py genie or dit wrote them (e.g. "
                        "genie_true=results/genie_true_eval.json)")
    p.add_argument("--json", default="results/controls_eval.json", help="where to write (default "
                                                                        "results/controls_eval.json)")
    p.add_argument("--gif_models", nargs="+", metavar="FOLDER",
                   help="Genie model folders (train_genie.py --out) to show in --gif: a held-out prompt of --data with "
                        "'right' held beside 'left' held, a row per world; a latent world plays through the keys "
                        "that evaluate.py genie fitted (controls.json)")
    p.add_argument("--data", default="videos/coinrun", help="the store the --gif prompt comes from (default "
                                                            "videos/coinrun)")
    p.add_argument("--gif", default="results/controls_play.gif", help="GIF to write (default "
                                                                      "results/controls_play.gif)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_precision_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and the sampling")
    p = sub.add_parser("plot", help="training curves from logs/*.json (e.g. a run at 1x, 2x, 4x the steps)")
    p.add_argument("logs", nargs="+", help="training logs, e.g. models/genie/logs/tokenizer.json")
    p.add_argument("--key", default="loss", help="logged value to draw (default loss; e.g. recon, ce, flow)")
    p.add_argument("--out", default="results/curves.png", help="PNG to write (default results/curves.png)")
    args = parser.parse_args()
    if any(n < 0 for n in getattr(args, "labels", [])):
        raise UserError(f"--labels takes counts of labelled transitions, 0 for all, not {args.labels}")
    if getattr(args, "cfg_scale", 0) < 0:  # genie and dit
        raise UserError(f"--cfg_scale must be at least 0, not {args.cfg_scale:g}")
    if args.command == "plot":
        return plot_logs(args)
    device = get_device(args.device, precision=args.precision)
    if args.command == "idm":
        seed_everything(args.seed)
        return evaluate_idm(args, device)
    with autocast(device):  # the models run as they trained and as they are played: bf16 on CUDA (--precision)
        if args.command == "genie":
            seed_everything(args.seed)
            evaluate_genie(args, device)
        elif args.command == "vae":
            evaluate_vae(args, device)
        elif args.command == "dit":
            evaluate_dit(args, device)
        elif args.command == "controls":
            evaluate_controls(args, device)


if __name__ == "__main__":
    run_cli(main)
