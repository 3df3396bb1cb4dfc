# The two commands of the README:
#   make repro   set up .venv if needed, then run the whole DVC pipeline (embedded default)
#   make test    set up .venv if needed, then run the test suite
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro test
setup:
	@scripts/bootstrap.sh

repro: setup
	python -m pipelines.repro

test: setup
	python -m pytest -q
