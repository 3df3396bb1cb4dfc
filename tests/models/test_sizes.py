"""SD 1.5 parameter figures of the Base ControlNet and one rank-128 adapter (meta device); the
tiny preset's figures follow params.yaml ``backbone.tiny``."""
from __future__ import annotations

import json

import pytest
import yaml

import _models_helpers  # noqa: F401  (HF offline)
from _models_helpers import REF

from ctrlora.models.backbone import TinyBackboneConfig, tiny_backbone_config
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
    cfg = tiny_backbone_config()
    levels, lpb = len(cfg.unet_block_out_channels), cfg.unet_layers_per_block
    resblocks, transformers = levels * lpb + 2, (levels - 1) * lpb + 1  # + the mid block's
    assert out["adapter"]["lora_layers"] == 2 + resblocks + 10 * transformers  # 2 time MLP linears


def _params_file(tmp_path, **tiny):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"backbone": {"tiny": tiny}}))
    return path


def test_tiny_preset_is_built_from_the_params_file(tmp_path):
    tiny = dict(image_size=32, vae_block_out_channels=[16, 16], vae_layers_per_block=1,
                unet_block_out_channels=[16, 32], unet_layers_per_block=1, unet_attention_heads=[2, 2],
                norm_num_groups=8, cross_attention_dim=32, text_hidden_size=32,
                scheduler={"num_train_timesteps": 1000})
    small = compute_sizes("tiny", rank=2, params_file=_params_file(tmp_path, **tiny))
    # 2 levels x 1 ResBlock + 2 mid ResBlocks; 1 down + 1 mid transformer
    assert small["adapter"]["lora_layers"] == 2 + 4 + 10 * 2
    cfg = TinyBackboneConfig.from_params(tiny)
    assert cfg.unet_block_out_channels == (16, 32) and cfg.vae_scale_factor == 2
    with pytest.raises(ValueError, match=r"lack \['norm_num_groups'\]"):
        TinyBackboneConfig.from_params({k: v for k, v in tiny.items() if k != "norm_num_groups"})
    with pytest.raises(ValueError, match="unknown tiny backbone settings \\['unet_width'\\]"):
        TinyBackboneConfig.from_params({**tiny, "unet_width": 3})
    empty = tmp_path / "empty.yaml"
    empty.write_text("backbone: {}\n")
    with pytest.raises(KeyError, match="backbone.tiny"):
        tiny_backbone_config(empty)
    with pytest.raises(FileNotFoundError, match="no such params file"):
        tiny_backbone_config(tmp_path / "absent.yaml")


def test_params_file_from_the_environment(tmp_path, monkeypatch):
    from ctrlora.params import find_params_file

    path = _params_file(tmp_path, image_size=16)
    monkeypatch.setenv("CTRLORA_PARAMS", str(path))
    assert find_params_file() == path
    with pytest.raises(ValueError, match="lack"):
        tiny_backbone_config()
    monkeypatch.setenv("CTRLORA_PARAMS", str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError, match="CTRLORA_PARAMS"):
        find_params_file()
