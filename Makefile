PYTHON ?= python3

.PHONY: setup test demo

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) recipes/fft.py --config recipes/configs/demo.yaml
