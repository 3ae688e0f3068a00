# Two commands: `make test` and `make demo`. Each builds .venv first when it is missing or older
# than the requirements files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean-venv

$(VENV)/installed: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest -q tests

demo: $(VENV)/installed
	$(PY) demo.py

clean-venv:
	rm -rf $(VENV)
