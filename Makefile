PYTHON ?= python3

.PHONY: setup test demo demo-quick

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) recipes/fft.py --config recipes/configs/demo.yaml

# the demo job cut to 300 of its 1,200 steps (README: The demo)
demo-quick: setup
	$(PYTHON) recipes/fft.py --config recipes/configs/demo.yaml train.max_steps=300 output.dir=outputs/demo-quick
