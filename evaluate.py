"""Measure trained world models on held-out data, next to baselines; figures go to a table, JSON and plots.

  python evaluate.py genie --models models/genie videos/coinrun              # held-out CoinRun levels
  python evaluate.py genie --models models/genie videos/coinrun --clips 256 --horizon 16 --json results/genie_eval.json

genie reports:
  tokenizer_psnr, codebook_used        reconstruction PSNR (dB) and the fraction of the codebook used on held-out frames
  lam_usage, lam_codes_used,           fraction of transitions per latent action, actions with >= 2 % of them,
  lam_perplexity, nmi                  exp(entropy) of the usage, and the normalised mutual information between
                                       latent actions and the true actions the collector recorded (the models never
                                       saw them), next to nmi_chance (the same latents shuffled); the confusion
                                       table (true x latent) is drawn to a PNG heat map
  delta_psnr_t4, delta_psnr_long       controllability (Genie's Delta_t PSNR): PSNR of frames generated with the
                                       latent actions inferred from the real clip minus PSNR with random latent
                                       actions, at t = 4 and at t = --horizon
  rollout_psnr, baseline_psnr          PSNR per horizon step of the inferred-action rollout, and of copying the
                                       prompt frame (the baseline a world model must beat)
"""
import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from dataset import FrameStore, WindowDataset
from dynamics import Dynamics
from lam import LatentActionModel
from utils import UserError, atomic_path, atomic_write_text, get_device, load_model, positive, run_cli, \
    seed_everything
from vae import Tokenizer


def psnr(a, b):
    """Per-frame PSNR (dB) of frames in [-1, 1]: (..., C, H, W) -> (...)."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(-3).mean(-1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


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


@torch.no_grad()
def rollout(tokenizer, dynamics, first, actions, steps, temperature, generator):
    """Generate frames from the prompt first (B, 3, H, W) and actions (B, L): -> (B, L, 3, H, W)."""
    tokens = tokenizer.encode(first)
    cache = dynamics.start(tokens[:, None])
    frames = []
    for t in range(actions.shape[1]):
        tokens = dynamics.step(cache, actions[:, t], steps, temperature, generator)
        frames.append(tokenizer.decode(tokens))
    return torch.stack(frames, dim=1)


@torch.no_grad()
def evaluate_genie(args):
    device = get_device(args.device)
    models = Path(args.models)
    action_model = load_model(LatentActionModel, models / "lam", device)
    # A folder with only lam/ (an ablation run with --phase lam) gets the latent-action figures alone.
    tokenizer = load_model(Tokenizer, models / "tokenizer", device) if (models / "tokenizer").exists() else None
    dynamics = load_model(Dynamics, models / "dynamics", device) if (models / "dynamics").exists() else None
    store = FrameStore(args.data)
    if not store.has_actions:
        raise UserError(f"{args.data} has no true actions to compare the latent actions with (collect a game store)")
    dataset = WindowDataset(store, args.horizon + 1, split="val")
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(dataset), min(args.clips, len(dataset)), replace=False)
    generator = torch.Generator(device).manual_seed(args.seed)
    tokenizer_psnr, codes, latent, true, inferred_psnr, random_psnr, baseline_psnr = [], [], [], [], [], [], []
    for i in range(0, len(picks), args.batch_size):
        batch = [dataset[int(j)] for j in picks[i:i + args.batch_size]]
        frames = torch.stack([b["frames"] for b in batch]).to(device)  # (B, T, 3, 64, 64)
        actions = action_model.infer_actions(frames)  # (B, T - 1)
        latent.append(actions.flatten().cpu())
        true.append(torch.stack([b["actions"][:-1] for b in batch]).flatten())
        if tokenizer is None:
            continue
        tokens = tokenizer.encode(frames.flatten(0, 1))
        tokenizer_psnr.append(psnr(tokenizer.decode(tokens), frames.flatten(0, 1)).cpu())
        codes.append(tokens.unique().cpu())
        if dynamics is None:
            continue
        target = frames[:, 1:]
        shuffled = torch.randint(0, dynamics.config.num_actions, actions.shape, device=device, generator=generator)
        for acts, out in ((actions, inferred_psnr), (shuffled, random_psnr)):
            out.append(psnr(rollout(tokenizer, dynamics, frames[:, 0], acts, args.maskgit_steps, args.temperature,
                                    generator), target).cpu())
        baseline_psnr.append(psnr(frames[:, :1].expand_as(target), target).cpu())

    latent, true = torch.cat(latent).numpy(), torch.cat(true).numpy()
    num_actions = action_model.config.num_actions
    usage = np.bincount(latent, minlength=num_actions) / len(latent)
    results = {
        "clips": len(picks), "horizon": args.horizon, "maskgit_steps": args.maskgit_steps,
        "temperature": args.temperature,
        "lam_usage": usage.tolist(),
        "lam_codes_used": int((usage >= 0.02).sum()),
        "lam_perplexity": float(np.exp(entropy(usage))),
        "nmi": normalised_mutual_information(true, latent),
        # NMI is biased upwards on few samples: the same latent actions shuffled give the level of chance.
        "nmi_chance": normalised_mutual_information(true, rng.permutation(latent)),
    }
    if tokenizer is not None:
        results["tokenizer_psnr"] = float(torch.cat(tokenizer_psnr).mean())
        results["codebook_used"] = len(torch.cat(codes).unique()) / tokenizer.config.num_codes
    if dynamics is not None:
        inferred, shuffled, baseline = (torch.cat(x).mean(0) for x in (inferred_psnr, random_psnr, baseline_psnr))
        t4 = min(4, args.horizon) - 1
        results.update(delta_psnr_t4=float(inferred[t4] - shuffled[t4]), delta_psnr_long=float(inferred[-1] - shuffled[-1]),
                       rollout_psnr=inferred.tolist(), random_action_psnr=shuffled.tolist(),
                       baseline_psnr=baseline.tolist())
    names = store.meta.get("action_names") or [str(a) for a in range(store.meta["num_actions"])]
    table = np.zeros((len(names), num_actions), np.int64)
    np.add.at(table, (true, latent), 1)
    results["confusion"] = table.tolist()
    json_path = Path(args.json or "results/genie_eval.json")
    draw_confusion(json_path.with_name(json_path.stem + "_confusion.png"), table, names,
                   f"true action (rows) x latent action (columns), NMI {results['nmi']:.3f}")
    atomic_write_text(json_path, json.dumps(results, indent=1))

    print(f"held-out clips        {len(picks)} x {args.horizon + 1} frames of {args.data}")
    if tokenizer is not None:
        print(f"tokenizer PSNR        {results['tokenizer_psnr']:.2f} dB, codebook used {results['codebook_used']:.1%}")
    print(f"latent actions used   {results['lam_codes_used']} of {num_actions} (>= 2 %), perplexity "
          f"{results['lam_perplexity']:.2f}, usage " + " ".join(f"{u:.0%}" for u in usage))
    print(f"NMI with true actions {results['nmi']:.3f} (chance level {results['nmi_chance']:.3f})")
    if dynamics is not None:
        print(f"Delta PSNR            t=4: {results['delta_psnr_t4']:+.2f} dB, t={args.horizon}: "
              f"{results['delta_psnr_long']:+.2f} dB")
        print("horizon step          " + " ".join(f"{t:6d}" for t in range(1, args.horizon + 1)))
        for name, values in (("rollout PSNR", inferred), ("random actions PSNR", shuffled),
                             ("copy-first baseline", baseline)):
            print(f"{name:<22}" + " ".join(f"{v:6.2f}" for v in values.tolist()))
    print(f"wrote {json_path} and {json_path.with_name(json_path.stem + '_confusion.png')}")
    return results


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
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--json", help="where to write the figures (default results/genie_eval.json)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip choice and the sampling")
    args = parser.parse_args()
    seed_everything(args.seed)
    evaluate_genie(args)


if __name__ == "__main__":
    run_cli(main)
