# p11grid: make install | test | demo | bench | clean
# Stamps under build/stamps/ make a second `make install` a no-op unless an input changed.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := install

# Debian's Python, never pyenv's: the module embeds Debian's libpython.
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := build/stamps
MODULE := build/libp11grid.so

APT_PACKAGES := softhsm2 opensc libengine-pkcs11-openssl libp11-kit-dev nginx p11-kit curl \
	gnutls-bin python3-venv python3-dev libpython3-dev gcc make \
	pcscd vsmartcard-vpcd libpcsclite-dev swig iproute2 util-linux p11-kit-modules systemd \
	postgresql libnss3-tools
DEBIAN_MAJOR := $(shell cut -d. -f1 /etc/debian_version 2>/dev/null)
# pkcs11-provider is packaged from Debian 13 on only.
ifeq ($(DEBIAN_MAJOR),13)
APT_PACKAGES += pkcs11-provider
endif

NATIVE_SOURCES := $(wildcard native/*)
PROVIDER_SOURCES := $(shell find provider -name '*.py' 2>/dev/null)

.PHONY: install test demo bench clean distclean

install: $(MODULE)
	@echo "install: ready ($(MODULE))"

$(STAMPS):
	@mkdir -p $@

# Only missing packages are installed, and apt-get update runs only then.
$(STAMPS)/system: Makefile | $(STAMPS)
	@missing=""; \
	for package in $(APT_PACKAGES); do \
		dpkg -s "$$package" 2>/dev/null | grep -q '^Status: install ok installed' \
			|| missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "install: apt-get install$$missing"; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; \
			trap 'rm -f /usr/sbin/policy-rc.d' EXIT; \
		fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq; \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "install: system packages present (Debian $(DEBIAN_MAJOR))"; \
	fi
	@touch $@

# A virtualenv made by another interpreter (pyenv, a different Debian) is rebuilt.
$(STAMPS)/venv: pyproject.toml $(STAMPS)/system
	@if [ ! -x $(PY) ] || ! grep -qx 'home = /usr/bin' $(VENV)/pyvenv.cfg 2>/dev/null \
		|| ! $(PY) -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null; then \
		echo "install: creating $(VENV) with $(SYSTEM_PYTHON)"; \
		rm -rf $(VENV); \
		$(SYSTEM_PYTHON) -m venv $(VENV); \
	fi
	@echo "install: pip install -e '.[dev]'"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

$(MODULE): build.py $(NATIVE_SOURCES) $(PROVIDER_SOURCES) $(STAMPS)/venv
	@echo "install: building $(MODULE)"
	@$(PY) build.py

test: install
	@echo "test: ruff check ."
	@$(VENV)/bin/ruff check .
	@echo "test: pytest"
	@$(PY) -m pytest -q tests

demo: install
	@$(PY) -m p11grid.demo

bench: install
	@$(PY) bench/run.py

clean:
	@echo "clean: build/ and caches ($(VENV) kept; make distclean removes it too)"
	@rm -rf build .pytest_cache .ruff_cache *.egg-info
	@find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	@rm -rf $(VENV)
