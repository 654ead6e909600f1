# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Every dependency's version and hashes, as the last green run used them (docs/operations.md,
# "Dependencies"). pyproject.toml keeps the ranges the library accepts; `make lock` refreshes this.
LOCK    := requirements.lock
# The pip that installs the lock (its resolver and hash checks), pinned like the rest.
PIP_PIN := pip==26.3
# The CPU build: the lock pins it too (torch==2.13.0+cpu), so no step can pull a multi-GB CUDA build.
TORCH   := torch==2.13.0
LOCK_EXTRAS := test,api,bench,quant

.PHONY: demo test check bench install deb system-test clean lock test-latest

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_PIN)
	# Exactly the lock: every file checked against its hash, nothing resolved anew (--no-deps).
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	# The project itself, built with the lock's setuptools, its dependencies already there.
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

# Refresh the lock to the newest releases within pyproject.toml's ranges, then run `make test` on
# it before committing it. One package: make lock UPGRADE=transformers; none (only add or drop
# what pyproject.toml changed): make lock UPGRADE=
UPGRADE ?= all
lock:
	test -x .venv-lock/bin/pip-compile || { $(PY) -m venv .venv-lock && .venv-lock/bin/pip install -q $(PIP_PIN) pip-tools; }
	echo '$(TORCH)' > .venv-lock/torch.txt
	CUSTOM_COMPILE_COMMAND='make lock' .venv-lock/bin/pip-compile -q --generate-hashes --strip-extras \
		--allow-unsafe --no-emit-find-links --no-emit-index-url --extra $(LOCK_EXTRAS) \
		-c .venv-lock/torch.txt $(if $(filter all,$(UPGRADE)),--upgrade,$(if $(UPGRADE),--upgrade-package '$(UPGRADE)')) -o $(LOCK) pyproject.toml

# The whole suite on the newest release of every dependency (torch stays $(TORCH): the newer builds
# here are CUDA ones of several GB). Not in CI: run it before `make lock` to find what would break.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q $(TORCH)
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[$(LOCK_EXTRAS)]'
	.venv-latest/bin/pip list --format=freeze | grep -iE '^(transformers|tokenizers|huggingface.hub|pyzmq|peft|accelerate|numpy)=='
	SWARM_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider --durations=10 tests

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py $(if $(MODEL),--model $(MODEL))

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 tests

check: $(STAMP)
	$(BIN)/ruff check swarmd libswarm tools tests examples
	$(BIN)/mypy
	$(BIN)/python tools/check_layout.py

bench: $(STAMP)
	$(BIN)/python tools/bench_inference.py

# The Debian package (dist/swarmd_VERSION_ARCH.deb): a venv under /opt/swarmd with $(TORCH) from
# pip's sources. For CUDA: make deb DEB_TORCH_INDEX=https://download.pytorch.org/whl/cu128 DEB_EXTRAS=gpu
DEB_TORCH_INDEX ?=
DEB_EXTRAS      ?=
deb: $(STAMP)
	$(BIN)/python tools/build_deb.py --torch '$(TORCH)' --lock $(LOCK) \
		$(if $(DEB_TORCH_INDEX),--torch-index '$(DEB_TORCH_INDEX)') $(if $(DEB_EXTRAS),--extras '$(DEB_EXTRAS)')

# The package under a real systemd: a Debian 12 container (systemd-nspawn; root, and
# `apt-get install systemd-container debootstrap`) walks the operator's path. tools/system_test.py
system-test: deb
	$(BIN)/python tools/system_test.py

clean:
	rm -rf $(VENV) .venv-lock .venv-latest build dist *.egg-info
