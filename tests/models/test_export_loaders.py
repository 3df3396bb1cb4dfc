"""``ctrlora export`` output loaded by the loaders users run: the CtrLoRA reference code and
ComfyUI-Advanced-ControlNet's CtrLoRA loader (on ComfyUI), through
``scripts/check_export_loaders.py`` in their own virtual environment. Their residuals must match
this project's model (and, for the fixture's weights, the reference's stored residuals) within
atol = rtol = 1e-4.

Needs the third-party sources and that environment, which ``scripts/check_export_loaders.sh``
sets up (under ``$CTRLORA_LOADERS_DIR``, default ``/tmp/ext``); skipped where they are absent."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _models_helpers import (REF, N_RESIDUALS, perturb, randomize_adapter, reference_io, residuals,
                             tiny_reference_model)

from ctrlora.cli import main
from ctrlora.models import adapters, convert
from ctrlora.models.controlnet import CtrLoRAControlNet

LOADERS = Path(os.environ.get("CTRLORA_LOADERS_DIR", "/tmp/ext"))
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_export_loaders.py"
NEEDED = {
    "venv": LOADERS / "venv" / "bin" / "python",
    "reference": LOADERS / "ctrlora" / "cldm" / "cldm_ctrlora_inference.py",
    "comfyui": LOADERS / "ComfyUI" / "comfy" / "cldm" / "cldm.py",
    "acn": LOADERS / "ComfyUI-Advanced-ControlNet" / "adv_control" / "control_ctrlora.py",
}
_missing = [str(p) for p in NEEDED.values() if not p.exists()]
if _missing:
    pytest.skip(f"third-party loaders not set up (missing {', '.join(_missing)}); run "
                f"`bash scripts/check_export_loaders.sh` to fetch them and build their environment",
                allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = dict(atol=1e-4, rtol=1e-4)


def _export(src: Path, out: Path, conds: list[str], fmt: str) -> None:
    argv = ["export", "--base", str(src / "base"), "--out", str(out), "--format", fmt]
    for c in conds:
        argv += ["--adapter", str(src / c)]
    assert main(argv) == 0


def _run_loaders(export: Path, conds: list[str], fmt: str, inputs: dict, tmp: Path, loaders: list[str]):
    """Residuals ``{loader: {cond: [13 tensors]}}`` and the report of the loader script."""
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp / "inputs.safetensors"))
    cmd = [str(NEEDED["venv"]), str(SCRIPT), "--export", str(export), "--format", fmt,
           "--inputs", str(tmp / "inputs.safetensors"), "--out", str(tmp / "res.safetensors"),
           "--report", str(tmp / "report.json"), "--ctrlora-src", str(LOADERS / "ctrlora"),
           "--comfyui-src", str(LOADERS / "ComfyUI"), "--acn-src", str(LOADERS / "ComfyUI-Advanced-ControlNet")]
    for c in conds:
        cmd += ["--adapter", c]
    for name in loaders:
        cmd += ["--loader", name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = load_file(str(tmp / "res.safetensors"))
    out = {name: {c: [res[f"{name}/{c}/{i}"] for i in range(N_RESIDUALS)] for c in conds} for name in loaders}
    return out, json.loads((tmp / "report.json").read_text())


def _ours(model, conds: list[str], inputs: dict) -> dict:
    out = {}
    with torch.no_grad():
        for c in conds:
            adapters.set_adapter(model, c)
            out[c] = residuals(model(inputs[f"hint.{c}"], inputs["timesteps"], inputs["context"]))
    return out


def _close(got: list, want: list, what: str) -> float:
    assert len(got) == len(want) == N_RESIDUALS
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (what, i)
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{what} residual {i}: {m}")
    return max((g - w).abs().max().item() for g, w in zip(got, want))


def _check_reference_report(rep: dict, conds: list[str], n_base: int, n_adapter: int) -> None:
    assert rep["loaded"], rep
    assert rep["not_loaded"] == [] and rep["base_unexpected"] == []
    assert rep["base_keys_loaded"] == n_base
    for c in conds:
        assert rep["adapters"][c] == {"keys_loaded": n_adapter, "unexpected": []}


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_reference_code_loads_the_fixture_weights_exported(fmt, tmp_path):
    """The fixture's base and adapters imported, exported again and loaded by the reference
    code: it reproduces its own stored residuals, and ours."""
    model = tiny_reference_model().eval()
    weights, _ = convert.convert_base(convert.read_state_dict(REF / "tiny_base.safetensors"), model)
    model.load_state_dict(weights, strict=True)
    src = tmp_path / "src"
    model.save_pretrained(src / "base")
    bh = adapters.base_hash(model)
    conds = ["lighting", "normal"]
    for cond, f in zip(conds, ("tiny_adapter", "tiny_adapter2")):
        tensors, rank = convert.convert_adapter(convert.read_state_dict(REF / f"{f}.safetensors"), model)
        adapters.save_adapter_tensors(tensors, src / cond, cond, rank, rank, bh, model)
        adapters.load_adapter(model, src / cond)
    _export(src, tmp_path / "published", conds, fmt)

    io = reference_io()
    inputs = {"timesteps": io["timesteps"], "context": io["context"], "hint.lighting": io["hint"],
              "hint.normal": io["hint2"]}
    got, report = _run_loaders(tmp_path / "published", conds, fmt, inputs, tmp_path, ["reference"])
    _check_reference_report(report["reference"], conds, n_base=238, n_adapter=246)
    ours = _ours(model, conds, inputs)
    errs = {}
    for cond, prefix in zip(conds, ("out", "out2")):
        errs[f"{cond} vs stored"] = _close(got["reference"][cond], [io[f"{prefix}_{i:02d}"] for i in range(13)],
                                           f"reference({cond}) vs stored {prefix}")
        errs[f"{cond} vs ours"] = _close(got["reference"][cond], ours[cond], f"reference({cond}) vs ours")
    print(f"reference loader, fixture weights ({fmt}): max abs", json.dumps(errs))

    if fmt == "safetensors":  # what the model card's caution says: ComfyUI builds 0 heads at width 32
        assert "fails to load it" in (tmp_path / "published" / "README.md").read_text()
        with pytest.raises(AssertionError, match=r"size mismatch for control_model\.middle_block\.1\.proj_out\.weight"):
            _run_loaders(tmp_path / "published", conds[:1], fmt, inputs, tmp_path, ["comfyui"])


def _wide_model():
    """Fixture-like layout at widths ComfyUI can place: 64 channels per head (ComfyUI takes the
    head count from its model table, not from the weights -- SD 1.5's 8 heads, else 64-channel
    heads), a channel change (so ResBlock skip_connection convs), two ResBlocks per level."""
    torch.manual_seed(5)
    return CtrLoRAControlNet(block_out_channels=(64, 128, 128, 128), layers_per_block=2,
                             attention_head_dim=(1, 2, 2, 2), cross_attention_dim=32)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_reference_and_comfyui_load_an_export_of_trained_folders(fmt, tmp_path):
    """Base and adapter folders as training writes them (one adapter with alpha = rank, one
    with alpha = 2 * rank, folded into `up` on export), exported and loaded by both loaders."""
    model = _wide_model()
    perturb(model, 1)
    src = tmp_path / "src"
    model.save_pretrained(src / "base")
    bh = adapters.base_hash(model)
    conds = ["lighting", "shade"]
    for cond, alpha, seed in zip(conds, (4, 8), (11, 12)):
        adapters.add_adapter(model, cond, rank=4, alpha=alpha)
        randomize_adapter(model, cond, seed=seed, scale=0.05)
        adapters.save_adapter(model, cond, src / cond, bh)
    _export(src, tmp_path / "published", conds, fmt)
    ldm = json.loads((tmp_path / "published" / "ldm_config.json").read_text())
    assert ldm["ctrlora_config"] == {}
    assert "## Caution" not in (tmp_path / "published" / "README.md").read_text()

    g = torch.Generator().manual_seed(0)
    inputs = {"timesteps": torch.tensor([999, 17]), "context": torch.randn(2, 7, 32, generator=g),
              "hint.lighting": torch.randn(2, 4, 16, 16, generator=g),
              "hint.shade": torch.randn(2, 4, 16, 16, generator=g)}
    got, report = _run_loaders(tmp_path / "published", conds, fmt, inputs, tmp_path, ["reference", "comfyui"])

    n_linears = len(adapters.lora_targets(model))
    n_own = sum(1 for k in convert.export_adapter(model, src / "lighting") if "lora_layer" not in k)
    n_base = len(convert.export_base(model, stale_rank=0)) - n_own
    _check_reference_report(report["reference"], conds, n_base=n_base, n_adapter=2 * n_linears + n_own)
    kwargs = ldm["controlnet_kwargs"]
    for cond in conds:
        rep = report["comfyui"]["adapters"][cond]
        assert rep["loaded"], rep
        assert rep["model_table"] == "BASE"  # no SD 1.5 match at this size: 64-channel heads
        assert rep["base_missing"] == [] and rep["base_unexpected_non_lora"] == []
        assert rep["base_unexpected_lora"] == 2 * n_linears  # the stale set, which the loader ignores
        assert rep["patch_keys_not_in_model"] == []
        assert rep["set_patches"] == n_own and rep["lora_patches"] == n_linears
        det = rep["detected"]
        assert det["model_channels"] == kwargs["model_channels"] and det["channel_mult"] == kwargs["channel_mult"]
        assert det["num_res_blocks"] == [kwargs["num_res_blocks"]] * len(kwargs["channel_mult"])
        assert det["context_dim"] == kwargs["context_dim"] and det["num_head_channels"] == 64

    model.eval()
    ours = _ours(model, conds, inputs)
    errs = {f"{loader}/{c}": _close(got[loader][c], ours[c], f"{loader}({c}) vs ours")
            for loader in ("reference", "comfyui") for c in conds}
    # the adapters matter: the base alone (no LoRA, base zero convs and norms) is far off
    adapters.set_adapter(model, None)
    with torch.no_grad():
        base = residuals(model(inputs["hint.lighting"], inputs["timesteps"], inputs["context"]))
    assert max((a - b).abs().max().item() for a, b in zip(ours["lighting"], base)) > 0.1
    print(f"reference / ComfyUI loaders, 64-wide export ({fmt}): max abs", json.dumps(errs))
