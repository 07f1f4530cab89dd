# kmeshd — one entry point for setting up, running and checking a checkout.
#   sudo make run     set up what is missing, then run kmeshd in the foreground
#   sudo make test    set up what is missing, then run every test (BPF tests included)
#   make check        ruff + mypy + tests (what CI runs)
#   sudo make bench   overhead benchmarks (figures for README and kmeshd(8)); bench-identity
#                     runs only the Kubernetes identity one

SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
KVER := $(shell uname -r)

# Debian packages: runtime (the versions the .deb depends on) and what the tests drive for real.
DEBS_RUNTIME := python3-bpfcc python3-prometheus-client python3-sdnotify python3-pythonjsonlogger \
	python3-requests python3-yaml python3-venv linux-headers-amd64
DEBS_TEST := bpftool iproute2 iptables prometheus prometheus-node-exporter systemd gcc make openssl \
	procps
DEV_TOOLS := pytest==8.3.4 ruff==0.8.4 mypy==1.13.0
# Type stubs only: --no-deps, or types-requests would pull a urllib3 2.x that shadows
# Debian's urllib3 1.26 under Debian's requests.
TYPE_STUBS := types-PyYAML==6.0.12.20261122 types-requests==2.33.0.20261030

.PHONY: run test check lint typecheck pytest bench bench-identity venv host-deps kernel-headers clean

run: venv kernel-headers
	$(VENV)/bin/python -m kmeshd.devrun

test: venv kernel-headers
	$(MAKE) check

check: lint typecheck pytest

lint:
	$(VENV)/bin/ruff check kmeshd tests
	$(VENV)/bin/ruff format --check kmeshd tests

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

bench: venv kernel-headers
	$(VENV)/bin/python -m tests.bench.run $(BENCH_ARGS)
	$(VENV)/bin/python -m tests.bench.identity $(BENCH_IDENTITY_ARGS)

bench-identity: venv kernel-headers
	$(VENV)/bin/python -m tests.bench.identity $(BENCH_IDENTITY_ARGS)

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
	@missing=$$(for p in $(DEBS_RUNTIME) $(DEBS_TEST); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# bcc compiles against /lib/modules/$(uname -r)/build. When the running kernel has no headers
# package, point it at Debian's (see ENVIRONMENT.md); and mount the filesystems BPF needs.
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
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
