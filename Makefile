# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: demo test check bench install deb system-test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so nothing below pulls a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,api,bench,quant]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

check: $(STAMP)
	$(BIN)/ruff check swarmd libswarm tools tests examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python tools/bench_inference.py

# The Debian package (dist/swarmd_VERSION_ARCH.deb): a venv under /opt/swarmd with $(TORCH) from
# pip's sources. For CUDA: make deb DEB_TORCH_INDEX=https://download.pytorch.org/whl/cu128 DEB_EXTRAS=gpu
DEB_TORCH_INDEX ?=
DEB_EXTRAS      ?=
deb: $(STAMP)
	$(BIN)/python tools/build_deb.py --torch '$(TORCH)' \
		$(if $(DEB_TORCH_INDEX),--torch-index '$(DEB_TORCH_INDEX)') $(if $(DEB_EXTRAS),--extras '$(DEB_EXTRAS)')

# The package under a real systemd: a Debian 12 container (systemd-nspawn; root, and
# `apt-get install systemd-container debootstrap`) walks the operator's path. tools/system_test.py
system-test: deb
	test -d .cache/models/smollm2-135m-instruct || \
		$(BIN)/swarmctl model --dir .cache/models get smollm2-135m-instruct
	$(BIN)/python tools/system_test.py

clean:
	rm -rf $(VENV) build dist *.egg-info
