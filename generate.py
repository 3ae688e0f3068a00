"""Continue a prompt video with the diffusion world model: the ViT-VAE encodes the prompt, the DiT generates frame
after frame, the VAE decodes them.

  python generate.py --prompt_video videos/z8r255LoVJc.mp4 --models models/ --num_frames 48
  python generate.py --prompt_video videos/coinrun_wide --models models/ --side_by_side --output results/generated.mp4

--models is a folder (or a Hugging Face hub repo id) holding vae2/ and dit/ as train_vae.py and train_dit.py write
them. A window of --prompt_frames frames is picked at random (seeded) from the first --prompt_max_frames frames of the
prompt video (a video file, prepared once at the store's 12 fps and 320x180, or a frame store), encoded in one batch
and sampled from the VAE's posterior. Each new frame starts as noise at t = 0 and is integrated with --steps Euler
steps while the context sits at --context_t; it then joins the context, whose keys and values are cached (dit.Sampler), and
past the DiT's training length the window slides. The mp4 shows the prompt then the continuation (with
--side_by_side: the true video on the left); a gif is written beside it.

A DiT trained with latent actions (train_dit.py --lam; the LAM in lam/ beside it) is steered: each generated frame is
led to by a latent action, --actions "3,3,1,..." or, without it, the LAM's reading of the true continuation when the
video has one (else random actions); --cfg_scale > 1 follows them more (classifier-free guidance, dit.Sampler).
Several sequences separated by "/" continue the same prompt with the same noise under each, side by side:
  python generate.py --prompt_video videos/coinrun_wide --models models/ --actions 2,2,2,2,2,2,2,2 --cfg_scale 2
  python generate.py --prompt_video videos/coinrun_wide --models models/ --actions 0,0,0,0,0,0/5,5,5,5,5,5
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import WindowDataset, open_frames
from dit import DiT, Sampler, check_lam, check_vae
from utils import (UserError, add_step_compile_flag, autocast, compile_step, first_line, from_uint8, get_device,
                   load_model, parse_actions, positive, run_cli, to_uint8, write_gif, write_mp4)
from lam import LatentActionModel
from vae2 import ViTVAE

CFG_SCALE = 1.0  # generate.py's and play.py's default guidance of the latent actions


def model_folder(models):
    """A local folder as is; otherwise a hub repo id, downloaded (or found in the hub's cache)."""
    if Path(models).is_dir():
        return Path(models)
    if Path(models).is_absolute() or str(models).count("/") != 1:
        raise UserError(f"model folder {models} does not exist")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(models)))
    except Exception as e:  # network, unknown repo, no access: all reported the same way
        raise UserError(f"cannot get {models} from the Hugging Face hub: {first_line(e)}") from None


def load_world(models, device):
    """The VAE, the DiT and the LAM of a models folder (vae2/, dit/, and lam/ for a DiT that takes latent actions;
    None without it), checked to fit together."""
    root = model_folder(models)
    vae, model = load_model(ViTVAE, root / "vae2", device), load_model(DiT, root / "dit", device)
    action_model = None
    if model.config.num_actions and (root / "lam").is_dir():
        action_model = load_model(LatentActionModel, root / "lam", device)
    try:
        check_vae(model.config, vae.config)
        if action_model is not None:
            check_lam(model.config, action_model.config)
    except ValueError as e:
        raise UserError(f"{root}: {e}") from None
    return vae, model, action_model


def compile_world(vae, model, device):
    """Compile what runs for every frame (utils.compile_step): the DiT's cached Euler step, which also serves the
    frame's commit to the cache, and the VAE's decode."""
    model.velocity = compile_step(model.velocity, device)
    vae.decode = compile_step(vae.decode, device)


def encode_clips(vae, model, frames, generator):
    """Clips (B, T, 3, H, W) in [-1, 1] -> (posterior draws, posterior means), scaled latents (B, T, N, C) each: the
    draws are the DiT's context (as in its training), the means what the LAM labels (as dataset.open_latent_actions)."""
    mu, logvar = vae.encode(frames.flatten(0, 1))  # (B * T, N, C)
    noise = torch.randn(mu.shape, device=mu.device, generator=generator)
    draws = (mu.float() + (0.5 * logvar.float()).exp() * noise) * model.config.latent_scale
    means = mu.float() * model.config.latent_scale
    return draws.unflatten(0, frames.shape[:2]), means.unflatten(0, frames.shape[:2])


def inferred_actions(action_model, model, means):
    """The LAM's latent actions of clips of scaled posterior means (B, T, N, C), labelled as the DiT's training
    actions were -> the action that led to each frame (B, T), frame 0's "no action"."""
    actions = action_model.infer_actions(means, model.config.lam_clip_len)  # (B, T - 1)
    return torch.cat([model.no_action(actions[:, :1]), actions], dim=1)


def decode_frame(vae, model, latents):
    """Generated frames' scaled latents (B, 1, N, C) -> uint8 pixels (B, H, W, 3), as the video gets them."""
    return to_uint8(vae.decode(latents[:, 0] / model.config.latent_scale))


def main():
    parser = argparse.ArgumentParser(description="Generate a continuation video from a prompt video.")
    parser.add_argument("--prompt_video", required=True, help="video file or frame store to take the prompt from")
    parser.add_argument("--prompt_max_frames", type=positive(int), default=10000,
                        help="pick the prompt from the first this many frames (default 10000)")
    parser.add_argument("--prompt_frames", type=positive(int), default=16, help="frames of prompt (default 16)")
    parser.add_argument("--num_frames", type=positive(int),
                        help="frames to generate (default: one per --actions, else 48)")
    parser.add_argument("--actions", help="a DiT trained with --lam or --actions true: the action leading to each "
                                          "generated frame, e.g. '3,3,1,0' (a true-action world also takes the "
                                          "game's action names: 'RIGHT,RIGHT,LEFT+UP'), or several such sequences "
                                          "separated by '/', shown side by side (default: the true continuation's "
                                          "actions, as recorded or as the LAM reads them, where the video has one; "
                                          "else random actions)")
    parser.add_argument("--cfg_scale", type=float, default=CFG_SCALE,
                        help="classifier-free guidance of the actions: 1 = none, larger follows them more "
                             f"(default {CFG_SCALE:g})")
    parser.add_argument("--steps", type=positive(int), default=10, help="Euler steps per frame (default 10)")
    parser.add_argument("--context_t", type=float, default=0.95,
                        help="flow time of the context frames: 1 = clean, lower = noisier (default 0.95)")
    parser.add_argument("--models", default="models/", help="folder or hub repo id with vae2/ and dit/ (and lam/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt window and the noise")
    parser.add_argument("--output", default="generated_video.mp4", help="mp4 to write; the gif goes beside it")
    parser.add_argument("--side_by_side", action="store_true",
                        help="show the true continuation on the left (the prompt video must be long enough)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_step_compile_flag(parser)
    args = parser.parse_args()
    if not 0 < args.context_t <= 1:
        raise UserError(f"--context_t must be in (0, 1], not {args.context_t}")
    if args.cfg_scale < 0:
        raise UserError(f"--cfg_scale must be at least 0, not {args.cfg_scale:g}")
    device = get_device(args.device)
    vae, model, action_model = load_world(args.models, device)
    num_actions = model.config.num_actions
    actions = None
    if args.actions is not None:
        if not num_actions:
            raise UserError(f"{args.models}: this DiT takes no actions (train it with train_dit.py --lam or "
                            f"--actions true to steer it); leave out --actions")
        actions = [parse_actions(sequence, num_actions, model.config.action_names)
                   for sequence in args.actions.split("/")]
        if {len(a) for a in actions} != {args.num_frames or len(actions[0])}:
            raise UserError(f"--actions gives {'/'.join(str(len(a)) for a in actions)} actions for "
                            f"{args.num_frames or len(actions[0])} frames: give one per generated frame")
    num_frames = args.num_frames or (len(actions[0]) if actions else 48)
    if args.compile:
        compile_world(vae, model, device)
    c = vae.config
    store = open_frames(args.prompt_video, size=(c.width, c.height))
    if (store.height, store.width) != (c.height, c.width):
        raise UserError(f"{args.prompt_video} holds {store.width}x{store.height} frames; the VAE takes "
                        f"{c.width}x{c.height}")

    # the prompt window (never across an episode boundary), with the true continuation after it when it is shown or
    # when the LAM reads the actions from it (then only where the video has one)
    true_actions = model.config.actions == "true" and num_actions > 0
    if true_actions and store.has_actions and store.meta["source"] != model.config.game:
        raise UserError(f"{args.prompt_video} holds {store.meta['source']}, the DiT was trained on the actions of "
                        f"{model.config.game}")
    recorded = true_actions and store.has_actions  # the prompt's own actions lead the context
    read_truth = actions is None and (action_model is not None or recorded)
    lengths = [args.prompt_frames + num_frames] * (args.side_by_side or read_truth) + \
        [args.prompt_frames] * (not args.side_by_side)
    for length in lengths:
        try:
            starts = WindowDataset(store, length, split="all").starts
        except UserError:
            starts = np.zeros(0, int)
        starts = starts[starts <= args.prompt_max_frames - args.prompt_frames]
        if len(starts):
            break
    else:
        needed = f"{length} frames in one episode (--prompt_frames" + \
            (" + --num_frames with --side_by_side)" if args.side_by_side else ")")
        raise UserError(f"{args.prompt_video} ({store.count} frames at {store.fps:g} fps) holds fewer than {needed} "
                        f"within its first --prompt_max_frames {args.prompt_max_frames} frames")
    start = int(np.random.default_rng(args.seed).choice(starts))
    truth = np.array(store.frames[start:start + length])  # (T, H, W, 3) uint8

    generator = torch.Generator(device).manual_seed(args.seed)
    frames = []
    with torch.no_grad(), autocast(device):
        clip = from_uint8(torch.from_numpy(truth).to(device).permute(0, 3, 1, 2))[None]  # (1, T, 3, H, W)
        draws, means = encode_clips(vae, model, clip, generator)
        led_to = None  # (1, T): the action that led to each frame of the clip
        if recorded:
            led_to = model.led_to(torch.from_numpy(np.array(store.actions[start:start + length]))[None].to(device))
        elif action_model is not None:
            led_to = inferred_actions(action_model, model, means)
        if actions is not None:
            sequences, source = torch.tensor(actions, device=device), "--actions"  # (S, F): S sequences
        elif led_to is not None and length > args.prompt_frames:
            sequences = led_to[:, args.prompt_frames:]
            source = "the true continuation's" if recorded else "the LAM's reading of the true continuation"
        else:
            sequences = torch.randint(0, max(1, num_actions), (1, num_frames), device=device, generator=generator)
            source = "random"
        if num_actions:
            names = model.config.action_names or [str(a) for a in range(num_actions)]
            print(f"{'true' if true_actions else 'latent'} actions ({source}): "
                  f"{'/'.join(','.join(names[a] for a in sequence) for sequence in sequences.tolist())}")
        sampler = Sampler(model, args.steps, args.context_t, cfg_scale=args.cfg_scale)
        noise = generator.get_state()  # each sequence of actions continues the prompt with the same noise
        started = time.time()
        with tqdm(total=num_frames * len(sequences), unit="frame", desc="generate") as bar:
            for sequence in sequences[:, None]:  # (1, F) each
                generator.set_state(noise)
                sampler.start(draws[:, :args.prompt_frames], generator,
                              None if led_to is None else led_to[:, :args.prompt_frames])
                decoded = []  # (1, 3, H, W) each, left on the device: one copy to the host per sequence, not per frame
                for i in range(num_frames):
                    latents = sampler.next_frame(sequence[:, i] if num_actions else None)
                    decoded.append(vae.decode(latents[:, 0] / model.config.latent_scale))
                    bar.update()
                    bar.set_postfix(fps=f"{bar.n / (time.time() - started):.2f}")
                frames.append(to_uint8(torch.cat(decoded)))  # (F, H, W, 3)

    # (P + F, H, W, 3) per sequence, side by side
    video = np.concatenate([np.concatenate([truth[:args.prompt_frames], f]) for f in frames], axis=2)
    if args.side_by_side:
        video = np.concatenate([truth, video], axis=2)
    output = Path(args.output)
    write_mp4(output, video, store.fps)
    write_gif(output.with_suffix(".gif"), video, store.fps)
    print(f"wrote {output} and {output.with_suffix('.gif')}: {args.prompt_frames} prompt frames (from frame {start}) "
          f"+ {num_frames} generated" + (f" under each of {len(sequences)} sequences of actions" if len(sequences) > 1 else "") +
          f", {num_frames * len(sequences) / (time.time() - started):.2f} frames/s")


if __name__ == "__main__":
    run_cli(main)
