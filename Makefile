# The two commands of the README:
#   make repro   set up .venv if needed, then run the whole DVC pipeline (embedded default)
#   make test    set up .venv if needed, then run the test suite
#   make foundation  rebuild the committed foundation (tiny backbone + re-detectors; ~12 min; docs/foundation.md)
#   make studio  the local web page over the registry (docs/studio.md); STUDIO_ARGS="--port 8000"
#   make test-sd15  the SD 1.5 path on random weights at 64 px: the stage entries, the whole graph through
#                  make repro's command with registration, a single-file import (minutes each, ~9 GB; not in make test)
#   make test-multiprocess  just the training under accelerate with 2 CPU processes (~2 min; also in make test)
#   make servers-e2e  real Prefect + MLflow servers: landed scans -> triggered retrain -> registry (docs/mlops.md)
# and the research graph (baselines and ablations, after the production graph; docs/research.md):
#   make research  dvc repro research/dvc.yaml, then the README's tables
#   make utility   dvc repro utility/dvc.yaml: segmenters trained with generated images, the memorization
#                  audit (after the production graph; docs/utility.md), then the README's tables
#   make efficiency  dvc repro efficiency/dvc.yaml: new-condition adapters on K = 30..1000 pairs, on the
#                  trained base vs a UNet-copy ControlNet vs a full fine-tune (after the production graph;
#                  docs/efficiency.md; ~1 h on 2 cores)
#   make report    rewrite the README's result tables from the committed metrics files
#   make retrain-demo  land LAND=40 new rendered scans in data/incoming (seed LAND_SEED=7) and run the
#                  retrain flow once, as a clinic's landing would (after `make repro`); its wall times
#                  go to reports/retrain_times.json and the README
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro foundation test test-sd15 test-multiprocess servers-e2e research utility efficiency report retrain-demo
setup:
	@scripts/bootstrap.sh

repro: setup
	python -m pipelines.orchestration.repro

# the foundation graph is a DVC project of its own (foundation/): it reads the rendered scans
foundation: setup
	dvc repro render
	cd foundation && dvc repro

test: setup
	@scripts/browser.sh
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m pytest -q -n 2 --dist loadfile

test-sd15: setup
	python -m pytest -q -m sd15

test-multiprocess: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m pytest -q -m multiprocess

servers-e2e: setup
	python -m pytest -q -s -p no:cacheprovider tests/pipelines/test_servers.py

research: setup
	dvc repro research/dvc.yaml
	python -m pipelines.orchestration.report

utility: setup
	dvc repro utility/dvc.yaml
	python -m pipelines.orchestration.report

efficiency: setup
	dvc repro efficiency/dvc.yaml
	python -m pipelines.orchestration.report

report: setup
	python -m pipelines.orchestration.report

LAND ?= 40
LAND_SEED ?= 7
retrain-demo: setup
	rm -rf .landing && ctrlora render --out .landing --n $(LAND) --seed $(LAND_SEED) --no-progress
	for d in .landing/*/; do id=$$(basename $$d); mv $$d data/incoming/$$id && touch data/incoming/$$id/READY; done
	rm -rf .landing
	python -m pipelines.orchestration.flows retrain
	python -m pipelines.orchestration.report

studio: setup
	ctrlora-ops studio $(STUDIO_ARGS)
