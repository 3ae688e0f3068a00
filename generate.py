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
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset import WindowDataset, open_frames
from dit import DiT, Sampler, check_vae
from utils import (UserError, add_step_compile_flag, autocast, compile_step, first_line, from_uint8, get_device,
                   load_model, positive, run_cli, to_uint8, write_gif, write_mp4)
from vae2 import ViTVAE


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
    """The VAE and the DiT of a models folder, checked to fit together."""
    root = model_folder(models)
    vae, model = load_model(ViTVAE, root / "vae2", device), load_model(DiT, root / "dit", device)
    try:
        check_vae(model.config, vae.config)
    except ValueError as e:
        raise UserError(f"{root}: {e}") from None
    return vae, model


def compile_world(vae, model, device):
    """Compile what runs for every frame (utils.compile_step): the DiT's cached Euler step, which also serves the
    frame's commit to the cache, and the VAE's decode."""
    model.velocity = compile_step(model.velocity, device)
    vae.decode = compile_step(vae.decode, device)


def decode_frame(vae, model, latents):
    """A generated frame's scaled latents (1, 1, N, C) -> uint8 pixels (1, H, W, 3), as the video gets them."""
    return to_uint8(vae.decode(latents[0] / model.config.latent_scale))


def main():
    parser = argparse.ArgumentParser(description="Generate a continuation video from a prompt video.")
    parser.add_argument("--prompt_video", required=True, help="video file or frame store to take the prompt from")
    parser.add_argument("--prompt_max_frames", type=positive(int), default=10000,
                        help="pick the prompt from the first this many frames (default 10000)")
    parser.add_argument("--prompt_frames", type=positive(int), default=16, help="frames of prompt (default 16)")
    parser.add_argument("--num_frames", type=positive(int), default=48, help="frames to generate (default 48)")
    parser.add_argument("--steps", type=positive(int), default=10, help="Euler steps per frame (default 10)")
    parser.add_argument("--context_t", type=float, default=0.95,
                        help="flow time of the context frames: 1 = clean, lower = noisier (default 0.95)")
    parser.add_argument("--models", default="models/", help="folder or hub repo id with vae2/ and dit/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt window and the noise")
    parser.add_argument("--output", default="generated_video.mp4", help="mp4 to write; the gif goes beside it")
    parser.add_argument("--side_by_side", action="store_true",
                        help="show the true continuation on the left (the prompt video must be long enough)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_step_compile_flag(parser)
    args = parser.parse_args()
    if not 0 < args.context_t <= 1:
        raise UserError(f"--context_t must be in (0, 1], not {args.context_t}")
    device = get_device(args.device)
    vae, model = load_world(args.models, device)
    if args.compile:
        compile_world(vae, model, device)
    c = vae.config
    store = open_frames(args.prompt_video, size=(c.width, c.height))
    if (store.height, store.width) != (c.height, c.width):
        raise UserError(f"{args.prompt_video} holds {store.width}x{store.height} frames; the VAE takes "
                        f"{c.width}x{c.height}")

    # the prompt window (never across an episode boundary), and the true continuation beside it when asked
    shown = args.prompt_frames + (args.num_frames if args.side_by_side else 0)
    needed = f"{shown} frames in one episode (--prompt_frames" + (" + --num_frames with --side_by_side)" if
                                                                 args.side_by_side else ")")
    try:
        starts = WindowDataset(store, shown, split="all").starts
    except UserError:
        raise UserError(f"{args.prompt_video} is too short: {store.count} frames at {store.fps:g} fps, fewer than "
                        f"{needed}") from None
    starts = starts[starts <= args.prompt_max_frames - args.prompt_frames]
    if len(starts) == 0:
        raise UserError(f"the first --prompt_max_frames {args.prompt_max_frames} frames hold no {needed}")
    start = int(np.random.default_rng(args.seed).choice(starts))
    truth = np.array(store.frames[start:start + shown])  # (T, H, W, 3) uint8
    prompt = from_uint8(torch.from_numpy(truth[:args.prompt_frames]).to(device).permute(0, 3, 1, 2))

    generator = torch.Generator(device).manual_seed(args.seed)
    scale = model.config.latent_scale
    frames = []
    with torch.no_grad(), autocast(device):
        mu, logvar = vae.encode(prompt)  # (P, N, C)
        noise = torch.randn(mu.shape, device=device, generator=generator)
        context = ((mu.float() + (0.5 * logvar.float()).exp() * noise) * scale)[None]  # (1, P, N, C)
        sampler = Sampler(model, args.steps, args.context_t).start(context, generator)
        started = time.time()
        with tqdm(total=args.num_frames, unit="frame", desc="generate") as bar:
            for i in range(args.num_frames):
                frames.append(decode_frame(vae, model, sampler.next_frame()))
                bar.update()
                bar.set_postfix(fps=f"{(i + 1) / (time.time() - started):.2f}")

    video = np.concatenate([truth[:args.prompt_frames]] + frames)  # (P + F, H, W, 3)
    if args.side_by_side:
        video = np.concatenate([truth, video], axis=2)
    output = Path(args.output)
    write_mp4(output, video, store.fps)
    write_gif(output.with_suffix(".gif"), video, store.fps)
    print(f"wrote {output} and {output.with_suffix('.gif')}: {args.prompt_frames} prompt frames (from frame {start}) "
          f"+ {args.num_frames} generated, {args.num_frames / (time.time() - started):.2f} frames/s")


if __name__ == "__main__":
    run_cli(main)
