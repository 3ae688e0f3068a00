# Two commands: `make test` and `make demo`. Each builds .venv first when it is missing or older
# than the requirements files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_FRAMES ?= 100000

.PHONY: test demo

$(VENV)/installed: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q tests

# The demo needs no internet beyond the package index: real CoinRun frames from procgen stand in for footage.
videos/coinrun/meta.json: | $(VENV)/installed
	$(PY) download.py procgen:coinrun --frames $(DEMO_FRAMES) --out videos/coinrun --overwrite

demo: $(VENV)/installed videos/coinrun/meta.json
	mkdir -p results
	$(PY) dataset.py info videos/coinrun | tee results/coinrun_info.txt
	$(PY) dataset.py preview videos/coinrun --frames 300 --scale 4 --out results/coinrun_preview.mp4
	# The footage path, offline: the preview goes through yt-dlp and prepare exactly as a downloaded video would.
	$(PY) download.py results/coinrun_preview.mp4 --out videos
	$(PY) dataset.py prepare videos/coinrun_preview.mp4 --fps 12 --size 320x180 --out videos/coinrun_preview_12fps_320x180
