"""SD 1.5 parameter figures of the Base ControlNet and one rank-128 adapter (meta device)."""
from __future__ import annotations

import json

import _models_helpers  # noqa: F401  (HF offline)
from _models_helpers import REF

from ctrlora.models.sizes import compute_sizes

COUNTS = json.loads((REF / "sd15_keys.json").read_text())["param_counts"]


def test_sd15_sizes_match_reference():
    s = compute_sizes("sd15", rank=128)
    base, ad = s["base_controlnet"], s["adapter"]
    assert base["params"] == COUNTS["base_file_without_lora(base weights incl. zero convs and norms)"] == 360_192_640
    assert abs(base["params"] / 1e6 - 360.19) < 0.1
    assert base["zero_convs"] == COUNTS["base_file_zero_convs"]
    assert base["hint_cnn"] == 0
    assert ad["params"] == COUNTS["adapter_total"] and abs(ad["params"] / 1e6 - 36.95) < 0.1
    assert ad["lora"] == COUNTS["adapter_lora_r128"]
    assert ad["zero_convs"] == COUNTS["adapter_zero_convs"]
    assert ad["norms"] == COUNTS["adapter_norms"]
    assert (ad["lora_layers"], ad["zero_conv_modules"], ad["norm_modules"]) == (82, 13, 28)
    assert abs(ad["fp32_MB"] - 147.8) < 0.5


def test_sd15_cnn_ablation_has_the_hint_block():
    s = compute_sizes("sd15", rank=128, condition_embedding="cnn")
    assert s["base_controlnet"]["hint_cnn"] == COUNTS["hint_block"]
    assert s["base_controlnet"]["params"] == COUNTS["plain_controlnet_with_hint_block"]


def test_cli_prints_json(capsys):
    from ctrlora.cli import main

    assert main(["sizes", "--preset", "tiny", "--rank", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "tiny" and out["rank"] == 4
    assert out["adapter"]["params"] == out["adapter"]["lora"] + out["adapter"]["zero_convs"] + out["adapter"]["norms"]
    assert out["adapter"]["lora_layers"] == 60  # 2 time MLP + 8 ResBlocks + 5 transformers x 10
