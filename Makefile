# Two commands for a new user (see README.md):
#   make run    set everything up and run the appliance on the demo config
#   make test   set everything up and run the test suite
# Both install what is missing: mosquitto (apt), a virtualenv in .venv and this package.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
PYTEST_ARGS ?=

.PHONY: setup run test bench fuzz clean system-packages

setup: system-packages $(STAMP)

# mosquitto (the embedded broker), its clients and openssl (used by tests) and python3-venv, from apt
# when missing.
# A freshly installed Debian mosquitto enables its own service on port 1883, which would collide with
# the appliance's listener: we disable that service only when we installed the package ourselves.
system-packages:
	@missing=""; \
	 { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	 command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	 command -v openssl >/dev/null || missing="$$missing openssl"; \
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

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(BIN)/appliance run --config fixtures/demo/appliance.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/appliance bench --quick

# A long fuzz run of the codec and whole proxy sessions (outside the normal suite; docs/security.md).
fuzz: setup
	$(BIN)/python -m tests.security.fuzz --cases 1000000

clean:
	rm -rf $(VENV) .state .pytest_cache .hypothesis
