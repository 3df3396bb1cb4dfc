"""benchmarks/run_gpu.sh --smoke: the GPU script's whole chain at tiny sizes on the CPU (every
benchmark, the merge into one JSON and the README table). Marker ``sd15`` (``make test-sd15``):
about a dozen fresh Python processes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sd15, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[2]


def test_run_gpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    merged = json.loads((out / "cpu-smoke.json").read_text())
    assert merged["missing"] == []
    avf = merged["adapter_vs_full"]
    assert avf["ratios"]["trainable_params_adapter_over_full"] < 1 and avf["adapter"]["base_unchanged"]
    avf16 = merged["adapter_vs_full_16gb"]
    assert avf16["memory_preset"] == "16gb_no_bnb" and avf16["adapter"]["base_unchanged"]
    b1 = merged["memory_presets_b1"]["variants"]
    assert set(b1) == {"fp32", "ckpt", "preset_16gb_no_bnb", "preset_16gb"}
    assert b1["fp32"]["ratios_over_fp32"]["peak_mem_mb"] == 1.0
    assert b1["preset_16gb_no_bnb"]["runs"][0]["unet_dtype_after"] == "torch.bfloat16"
    # the preset also stores the ControlNet's frozen base in bf16; the adapter trains in fp32
    assert b1["preset_16gb_no_bnb"]["runs"][0]["controlnet_dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert b1["fp32"]["runs"][0]["controlnet_dtypes"] == ["torch.float32"]
    assert b1["ckpt"]["runs"][0]["attention_processors"] == ["AttnProcessor2_0"]
    # checkpointing recomputes, it does not change the loss of the same step
    assert b1["ckpt"]["runs"][0]["losses"] == pytest.approx(b1["fp32"]["runs"][0]["losses"], rel=1e-5)
    sampling = merged["sampling"]
    assert set(sampling["multi_condition"]) == {"1", "2", "3"}
    assert all(r["max_abs_latent_diff"] < 1e-3 and r["one_step_rel_diff"] < 1e-4
               for r in sampling["multi_condition"].values())
    assert sampling["images_per_s"]["shape"][0] == 2
    table = (out / "table.md").read_text()
    assert "preset `16gb_no_bnb`" in table and "after 1 step" in table
    assert "sequential / batched" in table and "images/s" in table and "`preset_16gb_no_bnb`" in table
    # the smoke run writes nothing into the repository's results
    assert not (REPO / "benchmarks" / "results" / "cpu-smoke.json").exists()
