"""Converter tests: SD 1.5 key layout (names and shapes vs the official list), exact round trips,
hand-applied LoRA, refusal of unknown / missing keys."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from _models_helpers import REF, residuals, tiny_reference_model

from ctrlora.models import adapters
from ctrlora.models import convert
from ctrlora.models.controlnet import CtrLoRAControlNet

SD15 = json.loads((REF / "sd15_keys.json").read_text())


@pytest.fixture(scope="module")
def sd15_model():
    from accelerate import init_empty_weights

    with init_empty_weights():
        return CtrLoRAControlNet(**convert.controlnet_config_from_ldm(convert.SD15_LDM_KWARGS))


def _meta(layout: dict) -> dict:
    return {k: torch.empty(tuple(s), device="meta") for k, s in layout.items()}


def test_sd15_official_layout_converts_completely(sd15_model):
    base_keys, adapter_keys = SD15["base_file"], SD15["adapter_file"]
    assert len(base_keys) == 488 and len(adapter_keys) == 246
    weights, stale = convert.convert_base(_meta(base_keys), sd15_model)
    assert len(stale) == 164
    expected = adapters.base_state_dict(sd15_model)
    assert set(weights) == set(expected)
    assert all(tuple(weights[k].shape) == tuple(expected[k].shape) for k in weights)
    tensors, rank = convert.convert_adapter(_meta(adapter_keys), sd15_model)
    assert rank == 128 and len(tensors) == 246
    assert sum(t.numel() for t in tensors.values()) == SD15["param_counts"]["adapter_total"]


def test_inverse_mapping_reproduces_official_names_and_shapes(sd15_model):
    """Build the published layout from the diffusers model with the inverse map: same names and
    shapes as the official list (base file incl. the stale LoRA set, and adapter file)."""
    base = adapters.base_state_dict(sd15_model)
    layout = adapters.adapter_layout(sd15_model, 128)
    lora = {k: torch.empty(s, device="meta") for k, s in layout.items() if ".lora_" in k}
    for which in ("base_file", "adapter_file"):
        official = SD15[which]
        ldm = convert.diffusers_to_ldm(base | _meta({k: s for k, s in layout.items() if ".lora_" not in k})
                                 if which == "adapter_file" else base, lora, 2, list(official))
        assert set(ldm) == set(official)
        bad = {k: (tuple(v.shape), tuple(official[k])) for k, v in ldm.items() if tuple(v.shape) != tuple(official[k])}
        assert not bad, list(bad.items())[:5]


def test_sd15_adapter_round_trip_exact(sd15_model):
    g = torch.Generator().manual_seed(0)
    official = SD15["adapter_file"]
    sd = {k: torch.randn(tuple(s), generator=g) for k, s in official.items()}
    tensors, rank = convert.convert_adapter(sd, sd15_model)
    layout = adapters.adapter_layout(sd15_model, rank)
    weights = {k: v for k, v in tensors.items() if ".lora_" not in k}
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    assert set(tensors) == set(layout)
    back = convert.diffusers_to_ldm(weights, lora, 2, list(official))
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] or torch.equal(back[k], sd[k]) for k in sd)


def test_tiny_base_round_trip_exact():
    model = tiny_reference_model()
    sd = convert.read_state_dict(REF / "tiny_base.safetensors")
    weights, lora = convert.convert_ldm_state_dict(sd, model.config.layers_per_block)
    model.load_state_dict(weights, strict=True)
    back = convert.diffusers_to_ldm(adapters.base_state_dict(model), lora, model.config.layers_per_block, list(sd))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_converted_adapter_equals_hand_applied_lora(tmp_path):
    """Converted adapter (peft LoRA + own zero convs / norms) == base with W + up @ down merged
    into every Linear and the adapter's zero convs / norms copied in, by hand."""
    base_sd = convert.read_state_dict(REF / "tiny_base.safetensors")
    ad_sd = convert.read_state_dict(REF / "tiny_adapter2.safetensors")
    g = torch.Generator().manual_seed(5)
    hint, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([3, 640])

    model = tiny_reference_model().eval()
    weights, _ = convert.convert_base(base_sd, model)
    model.load_state_dict(weights)
    tensors, rank = convert.convert_adapter(ad_sd, model)
    adapters.save_adapter_tensors(tensors, tmp_path / "ad", "x", rank, rank, adapters.base_hash(model), model)
    adapters.load_adapter(model, tmp_path / "ad")
    with torch.no_grad():
        ours = residuals(model(hint, t, ctx))

    # by hand, straight from the ldm names
    merged = {k: v.clone() for k, v in base_sd.items() if "lora_layer" not in k}
    for k, v in ad_sd.items():
        if k.endswith(".lora_layer.down.weight"):
            lin = k[: -len(".lora_layer.down.weight")]
            up = ad_sd[lin + ".lora_layer.up.weight"]
            merged[lin + ".weight"] = merged[lin + ".weight"] + up @ v
        elif "lora_layer" not in k:
            merged[k] = v  # zero convs, norms
    hand_model = tiny_reference_model().eval()
    hand_weights, _ = convert.convert_ldm_state_dict(merged, 2)
    hand_model.load_state_dict(hand_weights, strict=True)
    with torch.no_grad():
        hand = residuals(hand_model(hint, t, ctx))
    for a, b in zip(ours, hand):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(ours, hand)) < 1e-4


def test_refuses_unknown_and_missing_keys():
    model = tiny_reference_model()
    base = convert.read_state_dict(REF / "tiny_base.safetensors")
    adapter = convert.read_state_dict(REF / "tiny_adapter.safetensors")

    with pytest.raises(ValueError, match="control_model.input_blocks.1.0.frobnicate.weight"):
        convert.convert_base({**base, "control_model.input_blocks.1.0.frobnicate.weight": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match="must start with"):
        convert.convert_base({**base, "model.diffusion_model.out.0.weight": torch.zeros(1)}, model)
    missing = dict(base)
    del missing["control_model.input_blocks.4.0.in_layers.2.weight"]
    with pytest.raises(ValueError, match=r"down_blocks\.1\.resnets\.0\.conv1\.weight"):
        convert.convert_base(missing, model)
    with pytest.raises(ValueError, match="hint CNN"):
        convert.convert_base({**base, "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, model)

    with pytest.raises(ValueError, match="time_embed.0.weight"):
        convert.convert_adapter({**adapter, "control_model.time_embed.0.weight": torch.zeros(128, 32)}, model)
    no_zc = {k: v for k, v in adapter.items() if "zero_convs.5." not in k}
    with pytest.raises(ValueError, match=r"controlnet_down_blocks\.5\.(weight|bias)"):
        convert.convert_adapter(no_zc, model)
    half = {k: v for k, v in adapter.items() if k != "control_model.time_embed.2.lora_layer.up.weight"}
    with pytest.raises(ValueError, match="time_embedding.linear_2"):
        convert.convert_adapter(half, model)
    wrong = dict(adapter)
    wrong["control_model.middle_block_out.0.weight"] = torch.zeros(32, 32, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        convert.convert_adapter(wrong, model)


def test_reads_pickles_only_as_weights(tmp_path):
    import argparse

    torch.save({"control_model.x": argparse.Namespace(a=1)}, tmp_path / "evil.ckpt")
    # weights_only=True refuses arbitrary objects; the error names the file, not torch's way around it
    with pytest.raises(ValueError, match=r"evil\.ckpt: refused.*argparse\.Namespace") as err:
        convert.read_state_dict(tmp_path / "evil.ckpt")
    assert "weights_only" not in str(err.value)
    torch.save({"state_dict": {"control_model.time_embed.0.weight": torch.ones(2)}}, tmp_path / "w.ckpt")
    assert list(convert.read_state_dict(tmp_path / "w.ckpt")) == ["control_model.time_embed.0.weight"]
    save_file({"a": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    assert convert.read_state_dict(tmp_path / "a.safetensors")["a"].item() == 1.0
    (tmp_path / "x.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        convert.read_state_dict(tmp_path / "x.pkl")
