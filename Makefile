# Two commands for a new user (see README.md):
#   make run    set everything up and run the appliance on the demo config
#   make test   set everything up, type-check (mypy --strict) and run the test suite
# Both install what is missing: mosquitto (apt), a virtualenv in .venv and this package, with every
# dependency at the version and hash pinned in requirements-test.lock (`make lock` regenerates it).
#   make deb         Debian packages for arm64 and amd64 in dist/ (docs/install.md)
#   make test-arm64  install the arm64 package in an emulated Debian bookworm arm64 root filesystem
#                    and smoke-test it there (FULL=1: the whole suite; TESTS="PATHS": those tests)
#   make test-systemd  run both packages' unit under a real systemd (systemd-nspawn)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-test.lock | cksum | cut -d' ' -f1)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
PYTEST_ARGS ?=

.PHONY: setup run test bench fuzz chaos clean system-packages lock deb test-arm64 test-systemd

setup: system-packages $(STAMP)

# mosquitto (the embedded broker), its clients and openssl (used by tests), chromium and its driver
# (the console's browser tests) and python3-venv, from apt when missing.
# A freshly installed Debian mosquitto enables its own service on port 1883, which would collide with
# the appliance's listener: we disable that service only when we installed the package ourselves.
system-packages:
	@missing=""; \
	 { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	 command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	 command -v openssl >/dev/null || missing="$$missing openssl"; \
	 command -v chromium >/dev/null || missing="$$missing chromium"; \
	 command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	 $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	 if [ -n "$$missing" ]; then \
	   echo "Installing with apt:$$missing"; \
	   $(APT) update -qq && $(APT) install -y -qq $$missing; \
	   case "$$missing" in *" mosquitto"*) \
	     if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
	       echo "Disabling the distribution's own mosquitto service (the appliance runs its own)"; \
	       $(SUDO) systemctl disable --now mosquitto.service || true; \
	     fi;; \
	   esac; \
	 fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	 { echo "Python 3.11 or newer is required (found $$($(PYTHON) --version))"; exit 1; }

# Dependencies only from the lock (--require-hashes: a changed or substituted file is refused), then
# this package itself without resolving anything again.
$(STAMP): pyproject.toml requirements-test.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-test.lock
	$(BIN)/pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

# The lock files, from pyproject.toml's dependencies: requirements.lock (what the service runs on;
# the Debian packages install exactly this) and requirements-test.lock (the same pins plus the test
# tools; `make setup`). Run after changing dependencies in pyproject.toml; existing pins are kept
# unless UPGRADE=1. Hashes cover every file of each pinned release, so one lock serves amd64 and
# arm64; packaging/check-wheels.sh then proves both have cp311 wheels. The machine's own pip config
# (local wheel directories) is ignored so that the hashes are the index's.
LOCK_ENV   := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null
LOCK_FLAGS := -q --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
              $(if $(UPGRADE),--upgrade)
lock: $(STAMP)
	$(BIN)/pip install -q 'pip-tools>=7.4'
	$(LOCK_ENV) $(BIN)/pip-compile $(LOCK_FLAGS) -o requirements.lock pyproject.toml
	$(LOCK_ENV) $(BIN)/pip-compile $(LOCK_FLAGS) --extra test -c requirements.lock -o requirements-test.lock pyproject.toml
	$(LOCK_ENV) packaging/check-wheels.sh $(BIN)/pip requirements.lock

run: setup
	$(BIN)/appliance run --config fixtures/demo/appliance.yaml

# mypy --strict over appliance/ and replay/ first (settings in pyproject.toml's [tool.mypy]), then
# the suite.
test: setup
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/appliance bench --quick

# A long fuzz run of the codec and whole proxy sessions (outside the normal suite; docs/security.md).
fuzz: setup
	$(BIN)/python -m tests.security.fuzz --cases 1000000

# A long crash run: 50 rounds of `kill -9` under load with the uplink cut at random, on one state dir
# (outside the normal suite, which runs 4; docs/performance.md, "Long runs").
chaos: setup
	$(BIN)/python -m tests.chaos.crash --rounds 50 --seed 7

# Debian packages for arm64 and amd64 (docs/install.md): the appliance in a virtualenv under
# /opt/mqtt-appliance with requirements.lock's wheels for each architecture, for Debian's python3.
VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DEB_VERSION ?= $(VERSION)-1
DEB_ARM64   := dist/mqtt-appliance_$(DEB_VERSION)_arm64.deb
DEB_AMD64   := dist/mqtt-appliance_$(DEB_VERSION)_amd64.deb
DEB_INPUTS  := pyproject.toml requirements.lock $(shell git ls-files appliance replay systemd packaging docs schemas README.md 2>/dev/null)
deb: $(DEB_ARM64) $(DEB_AMD64)
dist/mqtt-appliance_$(DEB_VERSION)_%.deb: $(DEB_INPUTS) | $(STAMP)
	DEB_VERSION=$(DEB_VERSION) PIP=$(BIN)/pip packaging/build-deb.sh $*

# The arm64 package installed and smoke-tested in an emulated Debian bookworm arm64 root filesystem,
# upgraded over itself, then the codec, governance and replay tests on it (FULL=1: every test).
# Needs root; the root filesystem is cached in /var/cache/mqtt-appliance (ROOTFS_CACHE).
test-arm64: $(DEB_ARM64)
	PIP=$(BIN)/pip TESTS="$(TESTS)" packaging/test-arm64.sh $(DEB_ARM64) $(FULL)

# Each package's unit under a real systemd (a bookworm root filesystem of its architecture booted
# with systemd-nspawn): start (Type=notify), a TLS key from a credential (amd64: qemu-user cannot set
# credentials up), reload, watchdog, an upgrade while running, stop.
test-systemd: $(DEB_AMD64) $(DEB_ARM64)
	packaging/test-systemd.sh $(DEB_AMD64)
	packaging/test-systemd.sh $(DEB_ARM64)

clean:
	rm -rf $(VENV) .state .pytest_cache .hypothesis build dist
