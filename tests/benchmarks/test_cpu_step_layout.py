"""benchmarks/cpu_step_layout.py at tiny scale: behaviour only (what each layout runs, valid JSON);
no wall-time assertion (the figures belong to benchmarks/README.md)."""
from __future__ import annotations

import argparse

import pytest

from benchmarks import cpu_step_layout as csl


@pytest.mark.parametrize("model", ["unet", "vae", "controlnet"])
def test_child_trains_the_default_tiny_model(model):
    r = csl.child(model, "bf16" if model == "vae" else "fp32", batch=2, steps=2, warmup=1)
    assert r["batch"] == 2 and r["median_step_s"] > 0


def test_controlnet_step_trains_what_train_base_trains():
    """The shared base and the active condition's LoRA learn; the frozen UNet does not."""
    import torch

    s = csl._Step("controlnet", 2)
    trained = {id(p) for p in s.params}
    assert trained and all(p.requires_grad for p in s.params)
    unet = s.net.unet
    assert not any(p.requires_grad for p in unet.parameters())
    before = [p.detach().clone() for p in s.params]
    opt = torch.optim.SGD(s.params, lr=1.0)
    s.loss(s.net).backward()
    opt.step()
    moved = sum(not torch.equal(b, p) for b, p in zip(before, s.params))
    assert moved > 0
    assert s.unused  # several base conditions: inactive LoRAs get no gradient, DDP must be told


def test_two_process_layout_splits_the_batch_and_sums_throughput():
    args = argparse.Namespace(steps=1, warmup=0)
    r = csl.layout_run("unet", "fp32", "2x1", 4, args)
    assert len(r["median_step_s"]) == 2  # two processes, two halves
    assert r["samples_per_s"] == pytest.approx(sum(2 / s for s in r["median_step_s"]))


def test_ddp_layout_runs_one_gloo_group_and_times_the_slower_rank():
    """Two ranks joined by gloo under DDP: one optimiser step of the whole batch per step."""
    args = argparse.Namespace(steps=1, warmup=0)
    r = csl.layout_run("controlnet", "fp32", "2x1-ddp", 4, args)
    assert len(r["median_step_s"]) == 2
    assert r["samples_per_s"] == pytest.approx(4 / max(r["median_step_s"]))


def test_ddp_ranks_end_with_identical_weights(tmp_path, monkeypatch):
    """The all-reduce is real: after DDP steps on different halves, both ranks hold the same weights
    (each rank prints a digest of its trained tensors)."""
    monkeypatch.setenv("CTRLORA_BENCH_DIGEST", "1")
    args = argparse.Namespace(steps=2, warmup=0)
    port = csl._free_port()
    rows = csl._collect([csl._spawn("unet", "fp32", 2, 1, args, rank=k, port=port) for k in range(2)])
    assert rows[0]["digest"] == rows[1]["digest"]
    port = csl._free_port()
    solo = csl._collect([csl._spawn("unet", "fp32", 2, 1, args, rank=k, port=port, ddp=False) for k in range(2)])
    assert solo[0]["digest"] != solo[1]["digest"]  # without the all-reduce, the halves train apart


def test_refusals():
    with pytest.raises(SystemExit):
        csl.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        csl.parse_args(["--models", "text_encoder"])
    with pytest.raises(SystemExit):
        csl.parse_args(["--precisions", "fp8"])
