# The two commands of the README, and what they need.  Both are idempotent:
# the virtual environment is made and the package (with its C core, built
# by cffi through pip) installed only when missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard */_*_build.py */*.c */*.h)

.PHONY: run test lint install bench check-units image image-minimal linux-check

# The sandbox's C part (devserver/_sandbox_build.py) needs libseccomp's
# header, which a fresh Debian machine lacks (the library itself is there).
# compileall: an editable install writes no bytecode, and where
# PYTHONDONTWRITEBYTECODE is set (this project's machines) Python never does,
# so every VMM and device process would compile each module it imports
# (~70 ms of a device process's start).  A stale .pyc is recompiled in memory
# by Python itself; this only saves time.
$(STAMP): $(SOURCES)
	test -e /usr/include/seccomp.h || { apt-get update -qq && apt-get install -y -qq libseccomp-dev; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	PYTHONDONTWRITEBYTECODE= $(PY) -m compileall -q ipc vmm devserver devices
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
	$(VENV)/bin/ruff check ipc vmm devserver devices tests examples systemd
	$(VENV)/bin/mypy

# The systemd units of systemd/: `systemd-analyze verify` must print nothing
# and the device service's exposure must be at most 1.0 (systemd/check_units.py).
check-units: $(STAMP)
	$(PY) systemd/check_units.py

# Every benchmark into one folder (vmm.bench.report): each one's JSON, report.md
# with the same-run ratios and targets, PNG plots.  BENCH_ARGS=--quick for a
# short run, BENCH_ARGS="--out DIR --only startup" and so on.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(PY) -m vmm.bench.report $(BENCH_ARGS)

# A Linux kernel and initramfs from Debian packages (printed paths; cached).
image: $(STAMP)
	$(PY) -m vmm.cli image

# A small kernel built from Debian's linux-source (vmm.minikernel; installs
# the build dependencies with apt; nice -n 19 make -j2; tens of minutes).
image-minimal: $(STAMP)
	$(PY) -m vmm.cli image --minimal

# The kernel of image-minimal (built first if needed) booted to its /init,
# which reads the virtio disk and powers off (minutes; not in `make test`).
# JSON report on stdout; LINUX_CHECK_ARGS="--kernel cloud" boots Debian's
# cloud kernel as far as this host allows, --qemu compares QEMU.
linux-check: $(STAMP)
	$(PY) -m tests.vmm.linux.long_boot $(LINUX_CHECK_ARGS)
