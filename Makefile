# The two commands a new user needs:   make demo   (set up + train the default model)
#                                      make test   (set up + run the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data browser demo test test-slow bench clean

setup: $(VENV)/.installed

# torch and torchvision are pinned to the CPU-machine builds that pip finds on these machines' disks;
# an unpinned `pip install torch` would pull a multi-GB CUDA build from the index.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,export,serve,bench]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; \
	fi

# A real headless browser for the test of `vitkit serve`'s page: Debian's Chromium and its WebDriver.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium chromium-driver; fi; \
	fi

demo: setup data
	$(BIN)/vitkit --help
	$(BIN)/vitkit train --run.overwrite true

# pytest exits 5 when it collected no tests: that is a broken suite here, not a pass.
# `data` and `browser` too, so that the tests that read the real Fashion-MNIST files and the one that drives
# Chromium run (and are not skipped) on a fresh machine.
test: setup data browser
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as failure" >&2; exit 1; fi; exit $$rc

test-slow: setup data browser
	@$(BIN)/python -m pytest -m slow; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no slow tests: treating as failure" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
