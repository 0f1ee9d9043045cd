PYTHON ?= python3
# The checkout root holds kernels/ and engine/, whose names installed packages also use (transformers
# imports Hugging Face's `kernels`): nothing launched from here may put the root on sys.path.
export PYTHONSAFEPATH := 1

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
