"""benchmarks/cpu_step_layout.py at tiny scale: behaviour only (what each layout runs, valid JSON);
no wall-time assertion (the figures belong to benchmarks/README.md)."""
from __future__ import annotations

import argparse

import pytest

from benchmarks import cpu_step_layout as csl


@pytest.mark.parametrize("model", ["unet", "vae"])
def test_child_trains_the_default_tiny_model(model):
    r = csl.child(model, "bf16" if model == "vae" else "fp32", batch=2, steps=2, warmup=1)
    assert r["batch"] == 2 and r["median_step_s"] > 0


def test_two_process_layout_splits_the_batch_and_sums_throughput():
    args = argparse.Namespace(steps=1, warmup=0)
    r = csl.layout_run("unet", "fp32", "2x1", 4, args)
    assert len(r["median_step_s"]) == 2  # two processes, two halves
    assert r["samples_per_s"] == pytest.approx(sum(2 / s for s in r["median_step_s"]))


def test_refusals():
    with pytest.raises(SystemExit):
        csl.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        csl.parse_args(["--models", "text_encoder"])
