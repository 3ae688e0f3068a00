"""Train the Genie pipeline on CoinRun: collect frames, then the tokenizer, the latent action model, the dynamics.

  python train_genie.py --phase all --preset tiny                       # CPU, minutes (what `make demo` runs)
  python train_genie.py --phase all                                     # one GPU, default sizes
  python train_genie.py --phase dynamics --steps 50000                  # rerun one phase on the earlier ones' output

Each phase writes a model folder (config.json + model.safetensors) under --out; later phases, play.py and
evaluate.py read them with no flags:
  models/genie/tokenizer   vae.Tokenizer             64x64 frame <-> 16x16 tokens
  models/genie/lam         lam.LatentActionModel     clip -> one latent action per transition
  models/genie/dynamics    dynamics.Dynamics         context tokens + latent action -> next frame's tokens
and a log of its losses to models/genie/logs/<phase>.json. The models never see the true actions in the store, except
a dynamics trained with --actions true, on them instead of latent ones (no LAM), which draws the clips where the player
turns round more often (--oversample_turns). The dynamics trains from models/genie/tokens (dataset.TokenStore): every
frame's tokens and every transition's latent action, computed once by the frozen tokenizer and LAM and again only when
either changes. A tokenizer with a focus on the player (--set 'tokenizer.focus=[28,20,44,44]') passes it to the
dynamics, whose loss weighs those tokens dynamics.focus_weight times the rest's.

Kill it at any time (Ctrl-C and SIGTERM save a training state first): rerunning the same command skips the finished
phases, continues the interrupted one from its last state in models/genie/checkpoints/<phase>/ and ends with the same
weights as an uninterrupted run (see training.py).
"""
import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dynamics
import lam
import vae
from dataset import ACTIONS, LATENT_ACTIONS, TOKENS, FrameStore, TokenStore, WindowDataset, label_transitions, model_id, \
    write_meta
from download import collect_procgen
from training import add_training_flags, distributed, rank_zero_first, train_loop
from utils import UserError, add_config_flags, apply_defaults, atomic_dir, autocast, build, from_uint8, get_device, load_model, \
    override, positive, run_cli, seed_everything

PHASES = ["collect", "tokenizer", "lam", "dynamics"]
PRESETS = {"tokenizer": vae.PRESETS, "lam": lam.PRESETS, "dynamics": dynamics.PRESETS}  # the model configs
# Training hyperparameters per preset: batch size, frames to collect, LAM clip length, and how much more often a
# dynamics on true actions sees the windows where the player turns (tiny: 31x, measured in docs/results.md with the
# dynamics' focus; the default preset's run is long enough to see them, not measured).
DEFAULTS = {
    "tiny": dict(batch_size=16, frames=50_000, lam_seq_len=4, oversample_turns=31),
    "default": dict(batch_size=64, frames=1_000_000, lam_seq_len=16, oversample_turns=1),
}
# ... and per phase: steps and peak learning rate. At the tiny preset the tokenizer is under-trained at 300 steps and
# lr 3e-4 (it passes 28 dB held-out at 2,400 steps), the conv LAM measured at 1e-3 (README, "Genie at the tiny
# preset"), and the dynamics' 300 steps fit best at 4e-3 of 1e-3, 2e-3 and 4e-3 (docs/results.md, "The dynamics'
# learning rate"); the default preset's are not re-measured.
PHASE_DEFAULTS = {
    "tiny": {"tokenizer": dict(steps=2400, lr=2e-3), "lam": dict(steps=300, lr=1e-3),
             "dynamics": dict(steps=300, lr=4e-3)},
    "default": {phase: dict(steps=50_000, lr=3e-4) for phase in ("tokenizer", "lam", "dynamics")},
}


def train(phase, model, loss_fn, dataset, args, device):
    """Train one phase: --steps and --lr when given, else the preset's for this phase."""
    args = argparse.Namespace(**{**vars(args), **PHASE_DEFAULTS[args.preset][phase],
                                 **{k: getattr(args, k) for k in ("steps", "lr") if getattr(args, k) is not None}})
    train_loop(model, loss_fn, dataset, args, device, Path(args.out) / phase, Path(args.out) / "logs" / f"{phase}.json",
               name=phase, project="gameworld-genie", unchanged={"data", "out", "phase", "frames", "set", "actions"})


def model_config(phase, args):
    """The preset's config for this phase with the --set overrides for it (e.g. lam.width=64) applied."""
    prefix = f"{phase}."
    return override(PRESETS[phase][args.preset], [item[len(prefix):] for item in args.set if item.startswith(prefix)])


def frames_store(args):
    store = FrameStore(args.data)
    if (store.height, store.width) != (64, 64):
        raise UserError(f"{args.data} holds {store.height}x{store.width} frames; the Genie models take 64x64 "
                        f"(collect with `download.py procgen:coinrun`, whose native size that is)")
    return store


def main():
    parser = argparse.ArgumentParser(description="Train the Genie pipeline (tokenizer, latent actions, dynamics).")
    parser.add_argument("--phase", default="all", choices=PHASES + ["all"],
                        help="which phase to run; 'all' runs them in order (an existing --data store is reused)")
    parser.add_argument("--data", default="videos/coinrun", help="frame store of 64x64 frames (default videos/coinrun)")
    parser.add_argument("--out", default="models/genie", help="folder for the three model folders and the logs")
    add_config_flags(parser, DEFAULTS, "tokenizer, LAM and dynamics (tiny: CPU; default: a GPU)", "PHASE.FIELD",
                     "lam.arch=transformer dynamics.depth=12 (the ablations of the README)")
    parser.add_argument("--steps", type=positive(int),
                        help="training steps of each phase run (tiny: tokenizer 2400, LAM 300, dynamics 300; "
                             "default 50000 each)")
    parser.add_argument("--batch_size", type=positive(int), help="clips per step (tiny 16, default 64)")
    parser.add_argument("--lr", type=positive(float),
                        help="peak learning rate of each phase run (tiny: tokenizer 2e-3, LAM 1e-3, dynamics 4e-3; "
                             "default 3e-4)")
    parser.add_argument("--lam_seq_len", type=positive(int), help="frames per LAM training clip (tiny 4, default 16)")
    parser.add_argument("--frames", type=positive(int), help="collect: CoinRun frames (tiny 50k, default 1M)")
    parser.add_argument("--oversample_turns", type=positive(int),
                        help="dynamics with --actions true: draw the clips where the player turns round (a left after "
                             "a right or the reverse) this many times as often as the others (tiny 31, default 1)")
    parser.add_argument("--actions", choices=["latent", "true"], default="latent",
                        help="dynamics: the actions each frame is conditioned on: latent, the LAM's (the lam phase's, "
                             "in --out); true, the game's own, recorded in the store, so that the world plays with the "
                             "game's keys and needs no LAM (default latent)")
    add_training_flags(parser)
    args = parser.parse_args()
    apply_defaults(args, DEFAULTS[args.preset])
    for item in args.set:  # every setting is checked now, also those of phases that run later or not at all
        if item.partition(".")[0] not in PRESETS:
            raise UserError(f"--set takes PHASE.FIELD=VALUE with PHASE in tokenizer, lam, dynamics, not {item!r}")
    for phase in PRESETS:
        model_config(phase, args)
    device = get_device(args.device, args.deterministic, args.precision)
    out = Path(args.out)
    phases = PHASES if args.phase == "all" else [args.phase]

    if "collect" in phases:
        if args.phase == "all" and Path(args.data).exists():
            print(f"collect: using the existing store {args.data}")
        else:  # under torchrun one process collects while the others wait for the store
            rank_zero_first(lambda: None if distributed()[0] else collect_procgen(
                "coinrun", Path(args.data), args.frames, num_envs=64, start_level=0, num_levels=0,
                distribution_mode="hard", seed=args.seed, size=None, max_hold=12))

    if "tokenizer" in phases:
        store = frames_store(args)
        seed_everything(args.seed)  # each phase from the seed: a phase run alone trains as it does within 'all'
        model = build(vae.Tokenizer, model_config("tokenizer", args)).to(device)
        train("tokenizer", model, lambda net, b, step: net(from_uint8(b["frames"][:, 0])), WindowDataset(store, 1), args, device)

    if "lam" in phases:
        store = frames_store(args)
        seed_everything(args.seed)
        model = build(lam.LatentActionModel, model_config("lam", args)).to(device)
        (out / "meaning.json").unlink(missing_ok=True)  # evaluate.py genie's labels of the previous LAM's actions
        train("lam", model, lambda net, b, step: net(from_uint8(b["frames"])),
              WindowDataset(store, args.lam_seq_len), args, device)

    if "dynamics" in phases:
        store, true_actions = frames_store(args), args.actions == "true"
        if true_actions and not store.has_actions:
            raise UserError(f"--actions true: {args.data} has no true actions (a store from a game collector, "
                            f"download.py procgen:... or ale:..., has them)")
        tokens = rank_zero_first(lambda: open_tokens(store, out, args.lam_seq_len, device, labels=not true_actions))
        tokenizer = load_model(vae.Tokenizer, out / "tokenizer").config
        config = dataclasses.replace(model_config("dynamics", args), vocab_size=tokenizer.num_codes,
                                     rows=tokens.grid[0], cols=tokens.grid[1], focus=tokenizer.focus_tokens)
        if true_actions:
            config = dataclasses.replace(config, num_actions=int(store.meta["num_actions"]), actions="true",
                                         action_names=list(store.meta.get("action_names") or []),
                                         game=str(store.meta["source"]))
        else:
            config = dataclasses.replace(
                config, num_actions=load_model(lam.LatentActionModel, out / "lam").config.num_actions)
        key = "actions" if true_actions else "latent_actions"
        seed_everything(args.seed)
        model = build(dynamics.Dynamics, config).to(device)
        clips = WindowDataset(tokens, config.context)
        if true_actions:
            clips.oversample(store.turns(), args.oversample_turns)
        train("dynamics", model, lambda net, b, step: net(b["tokens"], b[key]), clips, args, device)


@torch.no_grad()
def tokenize(store, out, lam_seq_len, device, labels, batch_size=64):
    """The frozen tokenizer's tokens of every frame of `store`, with labels the frozen LAM's action for every
    transition, and the store's true actions when it has them, into a token store at models/tokens
    (dataset.TokenStore), which the dynamics trains from. The LAM labels each episode in clips of lam_seq_len frames
    that overlap by one, so each transition is labelled once, having seen the frames of its clip up to it, as in the
    LAM's training."""
    tokenizer = load_model(vae.Tokenizer, out / "tokenizer", device)
    action_model = load_model(lam.LatentActionModel, out / "lam", device) if labels else None
    grid = tokenizer.config.grid
    with atomic_dir(out / "tokens") as tmp, autocast(device):
        tokens = np.memmap(tmp / TOKENS, np.uint16, "w+", shape=(store.count, grid, grid))
        for start in tqdm(range(0, store.count, batch_size), unit="batch", desc="tokens"):
            frames = from_uint8(store.window(start, batch_size)["frames"].to(device))
            tokens[start:start + len(frames)] = tokenizer.encode(frames).cpu().numpy()
        tokens.flush()
        del tokens
        if labels:
            np.save(tmp / LATENT_ACTIONS, label_transitions(
                store, action_model.infer_actions, lam_seq_len,
                lambda start, length: from_uint8(store.window(start, length)["frames"].to(device)), batch_size))
        if store.has_actions:
            shutil.copyfile(store.path / ACTIONS, tmp / ACTIONS)
        write_meta(tmp, **store.meta, grid=[grid, grid], tokenizer_id=model_id(out / "tokenizer"),
                   lam_id=model_id(out / "lam") if labels else "", frames=str(store.path.resolve()))
    return TokenStore(out / "tokens")


def open_tokens(store, out, lam_seq_len, device, labels=True):
    """The token store of `store` under the models in `out`: made once, and again only when the tokenizer has changed
    or, with labels (the LAM's actions, for a dynamics on latent actions), when the LAM has."""
    try:
        tokens = TokenStore(out / "tokens")
        stale = (tokens.tokenizer_id, tokens.count, tokens.meta.get("frames")) != (
            model_id(out / "tokenizer"), store.count, str(store.path.resolve()))
        stale = stale or (labels and tokens.lam_id != model_id(out / "lam"))
    except UserError:  # none yet, or an unusable one: made anew rather than trusted
        stale = True
    return tokenize(store, out, lam_seq_len, device, labels) if stale else tokens


if __name__ == "__main__":
    run_cli(main)
