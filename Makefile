# Two commands do everything on a fresh machine: `make demo` and `make test`. See README.md.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export BASE_IMAGE ?= voice-stack/debian-systemd:bookworm
# This machine's local wheels (the CPU torch wheel lives there); test hosts bind-mount it read-only.
export WHEELHOUSE ?= $(shell pip config get global.find-links 2>/dev/null || echo /opt/wheels)
export ANSIBLE_FORCE_COLOR ?= 0

MODELS      := build/models/tiny-bf16/config.json build/models/tiny-q8/config.json \
               build/models/tiny-stt/config.json build/models/tiny-tts/config.json \
               build/models/tiny-personaplex/config.json
ENGINE_TINY := engine/src/voice_engine/tiny
TOOLS_DIR   := tools/moshi-tools
KYUTAI_REQS := roles/moshi_server/files/requirements-kyutai.txt
SCENARIOS   ?= default q8 nvidia multihost redeploy engine hf
ARGS        ?=

.PHONY: help controller venv engine models lint unit molecule test demo demo-down bench-bridge bench-deploy clean

help:
	@echo "make demo        deploy the whole stack onto a local systemd container (CPU, tiny model)"
	@echo "make test        lint, unit tests and every Molecule scenario"
	@echo "make demo-down   remove the demo container"
	@echo "make controller  the controller tooling alone (ansible, molecule, lint; no torch): docs/controller.md"

# The controller tooling alone (ansible, molecule, lint tools; no torch): apt packages, Python >= 3.11,
# a half-made .venv repaired (scripts/bootstrap-controller.sh).
controller: $(VENV)/.controller
$(VENV)/.controller: requirements/controller.txt scripts/bootstrap-controller.sh
	./scripts/bootstrap-controller.sh controller $(VENV)
	touch $@

venv: $(VENV)/.stamp
$(VENV)/.stamp: $(VENV)/.controller $(KYUTAI_REQS) $(TOOLS_DIR)/pyproject.toml bridge/pyproject.toml engine/pyproject.toml \
  plugins/filter/torch_source.py
	# moshi for the tiny-model generator and the bridge's end-to-end tests: CPU torch first (the
	# wheelhouse's, else PyTorch's CPU index, else what to do: plugins/filter/torch_source.py, the same
	# choice as the test and demo hosts), then moshi's pinned requirements, then moshi itself with
	# --no-deps (its torch pin is <2.10).
	./scripts/bootstrap-controller.sh torch $(VENV) "$(WHEELHOUSE)" bitsandbytes==0.49.2 \
	  -r $(KYUTAI_REQS)
	$(PY) -m pip install -q --no-deps moshi==0.2.13
	# The bridge, editable, with what its tests and benchmark need.
	$(PY) -m pip install -q --no-build-isolation -e 'bridge[test]'
	# The voice engine, editable (its torch and moshi are the ones above).
	$(PY) -m pip install -q --no-build-isolation -e 'engine[test]'
	# Our Moshi host tools, editable (the hosts get them as a wheel; nothing to install: stdlib only).
	$(PY) -m pip install -q --no-build-isolation --no-deps -e $(TOOLS_DIR)
	touch $@

engine:
	./scripts/ensure-docker.sh
	./scripts/build-base-image.sh "$(BASE_IMAGE)"

models: $(MODELS)
build/models/tiny-%/config.json: $(TOOLS_DIR)/src/moshi_tools/tiny_model.py | $(VENV)/.stamp
	$(PY) -m moshi_tools.tiny_model --out build/models/tiny-$* --variant $*
# The engine's tiny sets (explicit rules win over the pattern above): STT-shaped, TTS-shaped with voices.
build/models/tiny-stt/config.json: $(wildcard $(ENGINE_TINY)/*.py) | $(VENV)/.stamp
	$(VENV)/bin/voice-engine tiny-model --kind stt --out build/models/tiny-stt
build/models/tiny-tts/config.json: $(wildcard $(ENGINE_TINY)/*.py) | $(VENV)/.stamp
	$(VENV)/bin/voice-engine tiny-model --kind tts --out build/models/tiny-tts
# PersonaPlex-shaped, with its voices under PersonaPlex's names (NATF2.pt: a .pt prompt, NATM0.wav: audio).
build/models/tiny-personaplex/config.json: $(wildcard $(ENGINE_TINY)/*.py) | $(VENV)/.stamp
	$(VENV)/bin/voice-engine tiny-model --kind personaplex --out build/models/tiny-personaplex
	rm -rf build/models/tiny-personaplex-voices && mkdir -p build/models/tiny-personaplex-voices
	cp build/models/tiny-personaplex/voices/TINYF0.pt build/models/tiny-personaplex-voices/NATF2.pt
	cp build/models/tiny-personaplex/voices/TINYM0.wav build/models/tiny-personaplex-voices/NATM0.wav

lint: $(VENV)/.stamp
	yamllint --strict .
	ansible-lint
	ruff check .
	ruff format --check .
	mypy plugins/filter $(TOOLS_DIR)/src/moshi_tools scripts roles/service_release/files roles/service_release/library \
	  roles/nvidia_runtime/library roles/nvidia_runtime/module_utils
	mypy --config-file bridge/pyproject.toml bridge/src
	mypy --config-file engine/pyproject.toml engine/src

unit: $(VENV)/.stamp
	pytest -q tests
	./scripts/ensure-chromium.sh  # bridge/tests/test_browser.py drives Debian's chromium
	pytest -q bridge/tests
	pytest -q engine/tests

molecule: $(VENV)/.stamp engine models
	mkdir -p .cache/pip-hosts
	# A scenario whose verifier finds no test would pass silently: treat that as a failure.
	for scenario in $(SCENARIOS); do \
	  molecule test --no-command-borders -s $$scenario 2>&1 | tee .cache/molecule-$$scenario.log; \
	  if grep -q "no tests found" .cache/molecule-$$scenario.log; then \
	    echo "Molecule scenario $$scenario ran no test"; exit 1; fi; \
	done

test: lint unit molecule

demo: $(VENV)/.stamp engine models
	mkdir -p .cache/pip-hosts
	./scripts/demo-container.sh up
	ansible-playbook -i inventory/local molecule/resources/prepare.yml
	ansible-playbook -i inventory/local playbooks/demo-mas.yml
	ansible-playbook -i inventory/local site.yml $(ARGS)
	PYTHONPATH=scripts $(PY) scripts/demo_summary.py

bench-bridge: $(VENV)/.stamp
	$(PY) -m personaplex_bridge.bench

# Deployment timings in the Molecule environment (fresh converge, idempotent re-run, bridge redeploy).
# BASELINE=REV runs the same steps from a worktree of REV first, for a side-by-side ratio.
bench-deploy: $(VENV)/.stamp engine models
	mkdir -p .cache/pip-hosts
	BASELINE=$(BASELINE) ./scripts/bench-deploy.sh

demo-down:
	./scripts/demo-container.sh down

clean: demo-down
	rm -rf build .cache
