# The two commands of the README, and what they need.  Both are idempotent:
# the virtual environment is made and the package (with its C core, built
# by cffi through pip) installed only when missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard */_*_build.py */*.c */*.h)

.PHONY: run test lint install bench image linux-check

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(STAMP)

# The main job: the demo guest with serial, virtio-rng, virtio-blk and virtio-console,
# each in its own process.
run: $(STAMP)
	$(PY) -m vmm.cli run

# The whole test suite.
test: $(STAMP)
	$(PY) -m pytest -q

# The linter (CI runs it after the tests).
lint: $(STAMP)
	$(VENV)/bin/ruff check ipc vmm devserver devices tests

# Benchmarks (JSON on stdout; not part of the tests).
bench: $(STAMP)
	$(PY) -m ipc.bench
	$(PY) -m devserver.bench
	$(PY) -m vmm.bench

# A Linux kernel and initramfs from Debian packages (printed paths; cached).
image: $(STAMP)
	$(PY) -m vmm.cli image

# Debian's cloud kernel booted as far as this host allows (minutes; not in
# `make test`).  JSON report on stdout; LINUX_CHECK_ARGS=--qemu compares QEMU.
linux-check: $(STAMP)
	$(PY) -m tests.vmm.linux.long_boot $(LINUX_CHECK_ARGS)
