# kmeshd — one entry point for setting up, running and checking a checkout.
#   sudo make run     set up what is missing, then run kmeshd in the foreground
#   sudo make test    set up what is missing, then run every test (BPF tests included)
#   make check        ruff + mypy + tests (what CI runs)
#   sudo make bench   overhead benchmarks (figures for README and kmeshd(8)); bench-identity
#                     runs only the Kubernetes identity one, bench-scale only the size
#                     ones (label sets, flows, a month's churn)
#   make man          man pages from their scdoc sources
#   make deb          build/kmeshd_<version>_all.deb

SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
KVER := $(shell uname -r)

# Debian packages: runtime (the versions the .deb depends on) and what the tests drive for real.
DEBS_RUNTIME := python3-bpfcc python3-prometheus-client python3-sdnotify python3-pythonjsonlogger \
	python3-requests python3-yaml python3-bcrypt python3-venv linux-headers-amd64
DEBS_TEST := bpftool iproute2 iptables prometheus prometheus-node-exporter systemd gcc make openssl \
	procps scdoc mandoc man-db python3-hypothesis
# What `make deb` needs, and the booted-systemd test around the package.
DEBS_PACKAGE := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	debootstrap systemd-container
DEV_TOOLS := pytest==8.3.4 ruff==0.8.4 mypy==1.13.0
# Type stubs only: --no-deps, or types-requests would pull a urllib3 2.x that shadows
# Debian's urllib3 1.26 under Debian's requests.
TYPE_STUBS := types-PyYAML==6.0.12.20261122 types-requests==2.33.0.20261030

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' kmeshd/__init__.py)
MAN_PAGES := man/kmeshd.8 man/kmeshd.toml.5
DEB := build/kmeshd_$(VERSION)_all.deb
# Reproducible man pages: dated by the last commit, not by the build.
export SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)

.PHONY: run test check lint typecheck pytest fuzz bench bench-identity bench-scale venv host-deps kernel-headers \
	man deb clean

run: venv kernel-headers
	$(VENV)/bin/python -m kmeshd.devrun

test: venv kernel-headers man deb
	$(MAKE) check

check: lint typecheck pytest

lint:
	$(VENV)/bin/ruff check kmeshd tests
	$(VENV)/bin/ruff format --check kmeshd tests

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

# Property-based tests at length: FUZZ_EXAMPLES inputs per target, random each run (the
# check profile is fixed and small). `--hypothesis-show-statistics` gives what each tried.
FUZZ_EXAMPLES ?= 5000
fuzz: venv
	KMESHD_FUZZ=$(FUZZ_EXAMPLES) $(VENV)/bin/python -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_fuzz_*.py $(PYTEST_ARGS)

bench: venv kernel-headers
	$(VENV)/bin/python -m tests.bench.run $(BENCH_ARGS)
	$(VENV)/bin/python -m tests.bench.bulk $(BENCH_BULK_ARGS)
	$(VENV)/bin/python -m tests.bench.sweep $(BENCH_SWEEP_ARGS)
	$(VENV)/bin/python -m tests.bench.paired $(BENCH_PAIRED_ARGS)
	$(VENV)/bin/python -m tests.bench.identity $(BENCH_IDENTITY_ARGS)
	$(VENV)/bin/python -m tests.bench.scale $(BENCH_SCALE_ARGS)
	$(VENV)/bin/python -m tests.bench.publish $(BENCH_PUBLISH_ARGS)
	$(VENV)/bin/python -m tests.bench.soak $(BENCH_SOAK_ARGS)
	$(VENV)/bin/python -m tests.bench.privilege $(BENCH_PRIVILEGE_ARGS)
	$(VENV)/bin/python -m tests.bench.storage $(BENCH_STORAGE_ARGS)

bench-scale: venv kernel-headers
	$(VENV)/bin/python -m tests.bench.scale $(BENCH_SCALE_ARGS)
	$(VENV)/bin/python -m tests.bench.publish $(BENCH_PUBLISH_ARGS)
	$(VENV)/bin/python -m tests.bench.soak $(BENCH_SOAK_ARGS)

bench-identity: venv kernel-headers
	$(VENV)/bin/python -m tests.bench.identity $(BENCH_IDENTITY_ARGS)

man: $(MAN_PAGES)

# scdoc writes paragraph macros mandoc warns about; man/tidy.py mends them.
man/%: man/%.scd man/tidy.py
	scdoc < $< | $(PYTHON) man/tidy.py > $@.tmp && mv $@.tmp $@

# The package is built from a staged copy of the tree: packaging/debian as debian/, with
# the unit, tmpfiles and logrotate files of systemd/ beside it.
deb: $(DEB)

DEB_SOURCES := pyproject.toml README.md $(shell find kmeshd bpf etc packaging/share -type f -not -path '*/__pycache__/*') \
	$(wildcard packaging/debian/* packaging/debian/*/*) $(wildcard systemd/*) $(MAN_PAGES)
$(DEB): $(DEB_SOURCES) | host-deps
	rm -rf build/deb && mkdir -p build/deb/kmeshd
	tar -c --exclude=__pycache__ pyproject.toml README.md kmeshd bpf etc packaging/share $(MAN_PAGES) \
		| tar -x -C build/deb/kmeshd
	cp -a packaging/debian build/deb/kmeshd/debian
	cp systemd/kmeshd.service systemd/kmeshd.tmpfiles systemd/kmeshd.logrotate systemd/kmeshd.sysusers \
		build/deb/kmeshd/debian/
	# Debian's own python3 (a pyenv one first on PATH has neither debhelper's modules nor bcc).
	cd build/deb/kmeshd && PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		dpkg-buildpackage --build=binary --no-sign > ../build.log 2>&1 \
		|| { tail -n 40 ../build.log; exit 1; }
	cp build/deb/kmeshd_$(VERSION)_all.deb $@

venv: $(VENV)/.done

# The venv is made by Debian's python3 with --system-site-packages: the bcc bindings exist
# only there, and the runtime dependencies must be Debian's own versions (--no-deps).
$(VENV)/.done: pyproject.toml | host-deps
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --no-deps -e .
	$(VENV)/bin/pip install -q $(DEV_TOOLS)
	$(VENV)/bin/pip install -q --no-deps $(TYPE_STUBS)
	$(VENV)/bin/python -c "import bcc, prometheus_client, sdnotify, pythonjsonlogger, requests, yaml"
	touch $@

host-deps:
	@missing=$$(for p in $(DEBS_RUNTIME) $(DEBS_TEST) $(DEBS_PACKAGE); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# bcc compiles against /lib/modules/$(uname -r)/build. When the running kernel has no headers
# package, point it at Debian's (README, "How it works"); and mount the filesystems BPF needs.
kernel-headers: host-deps
	@if [ ! -e /lib/modules/$(KVER)/build/Makefile ]; then \
		hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1); \
		common=$${hdr%-amd64}-common; \
		echo "linking kernel headers $$hdr for $(KVER)"; \
		mkdir -p /lib/modules/$(KVER); \
		ln -sfn $$hdr /lib/modules/$(KVER)/build; \
		ln -sfn $$common /lib/modules/$(KVER)/source; \
	fi
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs none /sys/kernel/tracing

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info build $(MAN_PAGES)
