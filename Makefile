# Three commands: `make test`, `make demo` and, on a CUDA GPU, `make gpu-check`. Each builds .venv first when it is missing or older
# than the requirements files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_FRAMES ?= 50000
DEMO_WIDE_FRAMES ?= 4000
# The demo's precision where bf16 pays, on a CPU with bf16 matrix units (Intel AMX, found in /proc/cpuinfo; elsewhere
# bf16 is slower than fp32 and the demo runs in fp32); the DiTs and the true-action Genie dynamics train faster in fp32
# at the tiny preset either way.
ifeq ($(origin BF16),undefined)
BF16 := $(shell grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null && echo --precision bf16)
endif

.PHONY: test demo gpu-check

$(VENV)/installed: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# The browser test drives Debian's chromium; as root, install it when missing (elsewhere the test says what to install).
test: $(VENV)/installed
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; }
	$(PY) -m pytest -q tests

# The demo needs no internet beyond the package index: real CoinRun frames from procgen stand in for footage.
videos/coinrun/meta.json: | $(VENV)/installed
	$(PY) download.py procgen:coinrun --frames $(DEMO_FRAMES) --out videos/coinrun --overwrite

# The diffusion pipeline's stand-in for the Celeste footage: CoinRun rendered at 320x180.
videos/coinrun_wide/meta.json: | $(VENV)/installed
	$(PY) download.py procgen:coinrun --frames $(DEMO_WIDE_FRAMES) --num_envs 16 --size 320x180 \
		--out videos/coinrun_wide --overwrite

demo: $(VENV)/installed videos/coinrun/meta.json videos/coinrun_wide/meta.json
	mkdir -p results
	$(PY) dataset.py info videos/coinrun | tee results/coinrun_info.txt
	$(PY) dataset.py preview videos/coinrun --frames 300 --scale 4 --out results/coinrun_preview.mp4
	# The footage path, offline: the preview goes through yt-dlp and prepare exactly as a downloaded video would.
	$(PY) download.py results/coinrun_preview.mp4 --out videos
	$(PY) dataset.py prepare videos/coinrun_preview.mp4 --fps 12 --size 320x180 --out videos/coinrun_preview_12fps_320x180
	# Genie: tokenizer, latent actions, dynamics at the CPU preset; beside it a dynamics on the game's true actions with
	# the same tokenizer, whose focus is the box where CoinRun's camera keeps the agent: its facing is what shows the
	# key held, and both dynamics weigh the agent's tokens (the true-action one also sees turns 31x as often). An inverse dynamics model trained on real frames reads which way each world moves when a key
	# is held (the following figure); the latent world's keys are fitted from 1,000, 100 and all labelled transitions.
	# $(BF16) where bf16 measured faster than fp32 on a CPU with bf16 matrix units (AMX): the convolutional models, the
	# Genie chain (tokenizer and LAM; its dynamics alone trains faster in fp32) and the Genie worlds' rollouts.
	# No loader processes for the Genie chain: its 64x64 frames need none, and on 2 cores they take cores from the step
	# (tokenizer: 6.3 steps/s without, 5.3 with the default 2); the ViT-VAE's 320x180 frames gain from them (16 s
	# against 20 s for 120 steps), the LAM and DiTs neither.
	$(PY) train_genie.py --phase all --preset tiny --data videos/coinrun --out models/genie $(BF16) --num_workers 0 \
		--set 'tokenizer.focus=[28,20,44,44]' tokenizer.focus_weight=10
	rm -rf models/genie_true && mkdir -p models/genie_true && cp -r models/genie/tokenizer models/genie/tokens models/genie_true/
	$(PY) train_genie.py --phase dynamics --actions true --preset tiny --data videos/coinrun --out models/genie_true --num_workers 0
	$(PY) evaluate.py idm videos/coinrun --json results/idm_eval.json $(BF16)
	$(PY) evaluate.py genie videos/coinrun --models models/genie --clips 64 --horizon 8 --json results/genie_eval.json \
		$(BF16)
	$(PY) evaluate.py genie videos/coinrun --models models/genie_true --clips 64 --horizon 8 \
		--json results/genie_true_eval.json $(BF16)
	$(PY) play.py --models models/genie --data videos/coinrun --actions 0,1,2,3,4,5,6,7,0,1,2,3,4,5,6,7 \
		--use_dataset_frame --output_dir results/genie_play
	# Latent diffusion: ViT-VAE, latents, a LAM on them and a DiT following its actions, at the CPU presets; evaluated on
	# held-out levels; a continuation video (actions read from the true one), and one prompt under two latent actions.
	$(PY) train_vae.py videos/coinrun_wide --preset tiny --out models/vae2 $(BF16)
	$(PY) dataset.py encode videos/coinrun_wide --vae models/vae2
	$(PY) train_lam.py videos/coinrun_wide_latents --vae models/vae2 --preset tiny --out models/lam $(BF16)
	$(PY) train_dit.py videos/coinrun_wide_latents --vae models/vae2 --lam models/lam --preset tiny --out models/dit
	rm -rf models/diffusion_true && mkdir -p models/diffusion_true && cp -r models/vae2 models/diffusion_true/
	$(PY) train_dit.py videos/coinrun_wide_latents --vae models/vae2 --actions true --preset tiny \
		--out models/diffusion_true/dit
	$(PY) evaluate.py vae videos/coinrun_wide --vae models/vae2 --json results/vae2_eval.json
	$(PY) evaluate.py idm videos/coinrun_wide --json results/idm_wide_eval.json $(BF16)
	$(PY) evaluate.py dit videos/coinrun_wide --models models --clips 16 --horizon 8 --samples 4 \
		--json results/dit_actions_eval.json
	$(PY) evaluate.py dit videos/coinrun_wide --models models/diffusion_true --clips 16 --horizon 8 --samples 4 \
		--json results/dit_true_eval.json
	# The four worlds side by side (results/controls_eval.json), and one prompt with right and left held in both Genie
	# worlds (results/controls_play.gif).
	$(PY) evaluate.py controls genie_true=results/genie_true_eval.json genie_latent=results/genie_eval.json \
		dit_true=results/dit_true_eval.json dit_latent=results/dit_actions_eval.json \
		--gif_models models/genie_true models/genie --data videos/coinrun
	$(PY) generate.py --prompt_video videos/coinrun_wide --models models --num_frames 24 --side_by_side \
		--output results/generated.mp4
	$(PY) generate.py --prompt_video videos/coinrun_wide --models models --prompt_frames 8 --side_by_side \
		--actions 4,4,4,4,4,4,4,4,4,4,4,4/7,7,7,7,7,7,7,7,7,7,7,7 --output results/diffusion_play.mp4
	$(PY) play.py --models models --data videos/coinrun_wide --actions 0,1,2,3,4,5,6,7,4,4,7,7 \
		--use_dataset_frame --output_dir results/diffusion_world_play
	$(PY) bench.py generate --preset tiny --json results/bench_generate_tiny.json

# On a rented CUDA GPU, first. It stops at once, in one line, when torch sees no GPU (bench.py cuda); otherwise it runs
# the CUDA tests (memory of every default preset against its estimate, compiled = eager, guided generation compiled,
# CUDA graphs never re-recorded, kill-and-resume) and bench.py at the default presets, all on cuda, going on past a
# failure so that every figure is written; results/gpu_check.json holds the figures and the failures, and the target
# fails when something did. About 10 minutes on one H100.
GPU_FIGURES := results/gpu_check
gpu-check: $(VENV)/installed
	@$(PY) bench.py cuda
	rm -rf $(GPU_FIGURES) && mkdir -p $(GPU_FIGURES)
	-GAMEWORLD_GPU_FIGURES=$(GPU_FIGURES) $(PY) -m pytest -q -rs tests/test_gpu.py --junitxml=$(GPU_FIGURES)/tests.xml
	-$(PY) bench.py cuda --json $(GPU_FIGURES)/cuda.json
	-for m in dit vae2 tokenizer lam dynamics; do \
		$(PY) bench.py train --device cuda --model $$m --preset default --runs 2 --json $(GPU_FIGURES)/train_$$m.json; done
	-$(PY) bench.py generate --device cuda --preset default --json $(GPU_FIGURES)/generate.json
	-$(PY) bench.py generate --device cuda --preset default --compile --json $(GPU_FIGURES)/generate_compiled.json
	-$(PY) bench.py play --device cuda --preset default --steps 200 --json $(GPU_FIGURES)/play.json
	-$(PY) bench.py play --device cuda --preset default --steps 200 --compile --json $(GPU_FIGURES)/play_compiled.json
	$(PY) bench.py gather $(GPU_FIGURES) --json results/gpu_check.json
