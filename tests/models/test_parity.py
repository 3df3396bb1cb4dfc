"""Parity with the reference CtrLoRA implementation (tests/fixtures/reference).

The published-layout base and adapter files go through the converter into the diffusers model;
the residuals must match the reference's within atol = rtol = 1e-4, and must NOT match the
negative control (the base file's stale LoRA set applied)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from _models_helpers import REF, N_RESIDUALS, reference_io, residuals, tiny_reference_model

from ctrlora.models import adapters
from ctrlora.models import convert
from ctrlora.models.controlnet import CtrLoRAControlNet

TOL = dict(atol=1e-4, rtol=1e-4)


def _close(outs, io, prefix):
    assert len(outs) == N_RESIDUALS
    worst = 0.0
    for i, o in enumerate(outs):
        ref = io[f"{prefix}_{i:02d}"]
        assert o.shape == ref.shape, (prefix, i)
        torch.testing.assert_close(o, ref, **TOL, msg=lambda m: f"{prefix}_{i:02d}: {m}")
        worst = max(worst, (o - ref).abs().max().item())
    return worst


def _far(outs, io, prefix):
    return max((o - io[f"{prefix}_{i:02d}"]).abs().max().item() for i, o in enumerate(outs))


@pytest.fixture(scope="module")
def io():
    return reference_io()


@pytest.mark.parametrize("ext", ["ckpt", "safetensors"])
def test_reference_residuals(ext, io, tmp_path):
    model = tiny_reference_model().eval()
    weights, stale = convert.convert_base(convert.read_state_dict(REF / f"tiny_base.{ext}"), model)
    assert len(stale) == 164  # the stale LoRA set is discarded
    model.load_state_dict(weights, strict=True)
    bh = adapters.base_hash(model)
    for name, f in (("a1", "tiny_adapter"), ("a2", "tiny_adapter2")):
        tensors, rank = convert.convert_adapter(convert.read_state_dict(REF / f"{f}.{ext}"), model)
        assert rank == 4 and len(tensors) == 246
        adapters.save_adapter_tensors(tensors, tmp_path / name, name, rank, rank, bh, model)
        adapters.load_adapter(model, tmp_path / name)  # through this project's adapter format

    t, ctx = io["timesteps"], io["context"]
    with torch.no_grad():
        adapters.set_adapter(model, None)
        base = residuals(model(io["hint"], t, ctx))
        adapters.set_adapter(model, "a1")
        out1 = residuals(model(io["hint"], t, ctx))
        adapters.set_adapter(model, "a2")
        out2 = residuals(model(io["hint2"], t, ctx))
        # both adapters in one batched forward, each on its own hint
        mixed = residuals(model(torch.cat([io["hint"], io["hint2"]]), torch.cat([t, t]), torch.cat([ctx, ctx]),
                                adapter_names=["a1", "a1", "a2", "a2"]))
    errs = {
        "base_out": _close(base, io, "base_out"),
        "out": _close(out1, io, "out"),
        "out2": _close(out2, io, "out2"),
    }
    down, mid = adapters.combine_residuals([(out1[:-1], out1[-1]), (out2[:-1], out2[-1])], [0.7, 0.3])
    errs["multi_out"] = _close(down + [mid], io, "multi_out")
    down, mid = adapters.combine_residuals([([r[:2] for r in mixed[:-1]], mixed[-1][:2]),
                                     ([r[2:] for r in mixed[:-1]], mixed[-1][2:])], [0.7, 0.3])
    errs["multi_out(mixed batch)"] = _close(down + [mid], io, "multi_out")
    print(f"parity max abs errors ({ext}):", json.dumps(errs))
    # negative control: a loader that kept the stale LoRA would produce stale_out
    assert _far(out1, io, "stale_out") > 1.0
    assert _far(base, io, "stale_out") > 1.0


def test_stale_lora_is_what_the_negative_control_shows(io):
    """Sanity of the fixture reading: applying the base file's own LoRA set by hand gives
    stale_out -- so the test above really distinguishes the two."""
    model = tiny_reference_model().eval()
    sd = convert.read_state_dict(REF / "tiny_base.safetensors")
    weights, lora = convert.convert_ldm_state_dict(sd, model.config.layers_per_block)
    for mod, (down, up) in convert.lora_pairs(lora).items():
        weights[mod + ".weight"] = weights[mod + ".weight"] + up @ down
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        outs = residuals(model(io["hint"], io["timesteps"], io["context"]))
    _close(outs, io, "stale_out")


def test_convert_cli_reproduces_reference(io, tmp_path, capsys):
    args = argparse.Namespace(base=REF / "tiny_base.ckpt", adapter=[REF / "tiny_adapter.safetensors"],
                              name=["lighting"], out=tmp_path, ldm_config=REF / "tiny_config.json")
    assert convert.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["discarded_stale_lora_keys"] == 164
    model = CtrLoRAControlNet.from_pretrained(tmp_path / "base").eval()
    cfg = adapters.read_adapter_config(tmp_path / "adapters" / "lighting")
    assert cfg["condition"] == "lighting" and cfg["rank"] == 4 and cfg["alpha"] == 4
    assert cfg["base_hash"] == adapters.base_hash(model)
    adapters.load_adapter(model, tmp_path / "adapters" / "lighting")
    with torch.no_grad():
        _close(residuals(model(io["hint"], io["timesteps"], io["context"])), io, "out")
