# The two front-door commands: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
DSK := $(VENV)/bin/dsk-provision
PYTEST := $(VENV)/bin/pytest
DEMO_NAME ?= demo
DEMO_NODES ?= 3
SANDBOX_ROOT ?= /var/lib/dsk-provision/sandbox
DEMO_INV := $(SANDBOX_ROOT)/$(DEMO_NAME)/hosts.yml

.PHONY: setup demo demo-down test test-unit test-integration lint bench

setup:
	VENV=$(VENV) bash scripts/setup-host.sh

demo: setup
	$(DSK) sandbox up --name $(DEMO_NAME) --nodes $(DEMO_NODES)
	$(DSK) check -i $(DEMO_INV)
	$(DSK) bootstrap -i $(DEMO_INV)
	$(DSK) validate -i $(DEMO_INV)
	$(DSK) train -i $(DEMO_INV) --config trainer/configs/tiny.toml
	@echo "The sandbox stays up: try 'source $(VENV)/bin/activate; dsk-provision sandbox status --name $(DEMO_NAME)'."
	@echo "Take it down with: make demo-down"

demo-down: setup
	$(DSK) sandbox down --name $(DEMO_NAME)

# Unit tests two at a time (a file's tests stay in one worker: module fixtures run once),
# then the sandbox tests one at a time; the exit status is non-zero if either failed.
test: setup
	$(PYTEST) -q -rs -n 2 --dist loadfile --durations=25 tests/unit; unit=$$?; \
	$(PYTEST) -q -rs --durations=30 tests/integration tests/gpu; rest=$$?; \
	test $$unit -eq 0 -a $$rest -eq 0

test-unit: setup
	$(PYTEST) -q -rs -n 2 --dist loadfile tests/unit

test-integration: setup
	$(PYTEST) -q -rs tests/integration

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/yamllint -s playbooks roles inventory
	cd . && $(VENV)/bin/ansible-lint --profile production playbooks roles

bench: setup
	$(VENV)/bin/python bench/provision_times.py
