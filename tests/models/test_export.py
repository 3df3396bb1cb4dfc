"""``ctrlora export``: base and adapter folders written in the published (ldm) CtrLoRA layout.

Exact round trips through ``ctrlora convert``; names, shapes, order and values of the reference
fixture's files; the SD 1.5 key list; refusals of bad input (one line naming the file, exit 2,
no output left behind)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _models_helpers import REF, perturb, randomize_adapter, tiny_ldm_kwargs, tiny_reference_model

from ctrlora.cli import main
from ctrlora.models import adapters, convert
from ctrlora.models.controlnet import CtrLoRAControlNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SD15 = json.loads((REF / "sd15_keys.json").read_text())
BASE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _two_level_model():
    """Shaped like the project's tiny preset: two levels of different widths (so a ResBlock
    skip_connection conv), one ResBlock per level, per-level heads of one width, 16 GroupNorm
    groups (a setting the ldm kwargs cannot express)."""
    torch.manual_seed(3)
    return CtrLoRAControlNet(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=32,
                             norm_num_groups=16)


def _save_folders(root: Path, model, specs) -> str:
    """``root/base`` (non-zero zero convs) and ``root/adapters/<condition>`` for every
    ``(condition, rank, seed)`` of ``specs``, with random non-zero LoRA; returns the base hash."""
    perturb(model, 1)
    model.save_pretrained(root / "base")
    bh = adapters.base_hash(model)
    for cond, rank, seed in specs:
        adapters.add_adapter(model, cond, rank=rank)
        randomize_adapter(model, cond, seed=seed, scale=0.5)
        adapters.save_adapter(model, cond, root / "adapters" / cond, bh)
    return bh


def _export(base: Path, out: Path, *adapter_dirs: Path, fmt: str | None = None, extra=()) -> int:
    argv = ["export", "--base", str(base), "--out", str(out), *extra]
    for a in adapter_dirs:
        argv += ["--adapter", str(a)]
    if fmt:
        argv += ["--format", fmt]
    return main(argv)


def _config(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}


@pytest.mark.parametrize("which,fmt", [("fixture-config", "safetensors"), ("two-level", "ckpt")])
def test_export_then_convert_gives_back_every_tensor(tmp_path, capsys, which, fmt):
    model = tiny_reference_model() if which == "fixture-config" else _two_level_model()
    specs = [("lighting", 4, 11), ("normal", 2, 12)] if which == "fixture-config" else [("segmentation", 3, 13)]
    src = tmp_path / "src"
    bh = _save_folders(src, model, specs)
    n_linears = len(adapters.lora_targets(model))

    out = tmp_path / "published"
    assert _export(src / "base", out, *(src / "adapters" / c for c, _, _ in specs), fmt=fmt) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "ldm_config.json", f"base.{fmt}"] + [f"{c}.{fmt}" for c, _, _ in specs])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    base_file = convert.read_state_dict(out / f"base.{fmt}")
    assert all(k.startswith("control_model.") and v.dtype == torch.float32 for k, v in base_file.items())
    stale = {k: v for k, v in base_file.items() if "lora_layer" in k}
    # the stale set: the first adapter's rank, all zeros
    assert len(stale) == 2 * n_linears == report["files"][0]["stale_tensors"]
    assert all(v.abs().max() == 0 for v in stale.values())
    assert {v.shape[0] for k, v in stale.items() if k.endswith("down.weight")} == {specs[0][1]}
    if fmt == "ckpt":  # a plain dict, no state_dict wrapper, readable as weights only
        raw = torch.load(out / f"base.{fmt}", weights_only=True)
        assert isinstance(raw, dict) and "state_dict" not in raw and list(raw) == list(base_file)

    card = (out / "README.md").read_text()
    for text in (bh, str(src / "base"), str(src / "adapters" / specs[0][0]), "ctrlora convert", "CtrLoRALoader",
                 "lora_layer.down.weight", f"| {specs[0][1]} |"):
        assert text in card, text
    assert ("norm_num_groups=16" in card) == (which == "two-level")
    # both widths are under 64 channels per level: ComfyUI would build no attention heads
    assert "ComfyUI takes the attention heads from its model table" in card and "fails to load it" in card

    back = tmp_path / "back"
    argv = ["convert", "--base", str(out / f"base.{fmt}"), "--ldm-config", str(out / "ldm_config.json"),
            "--out", str(back)]
    for c, _, _ in specs:
        argv += ["--adapter", str(out / f"{c}.{fmt}")]
    assert main(argv) == 0
    converted = json.loads(capsys.readouterr().out)
    assert converted["base_hash"] == bh and converted["discarded_stale_lora_keys"] == 2 * n_linears

    # the same network: the config (incl. what only ctrlora_config carries) and every base tensor
    assert _config(back / "base") == _config(src / "base")
    before, after = load_file(str(src / "base" / BASE_WEIGHTS)), load_file(str(back / "base" / BASE_WEIGHTS))
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    for cond, rank, _ in specs:
        a_dir, b_dir = src / "adapters" / cond, back / "adapters" / cond
        before = load_file(str(a_dir / adapters.ADAPTER_WEIGHTS))
        after = load_file(str(b_dir / adapters.ADAPTER_WEIGHTS))
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in before.items())
        assert set(after) == set(before)
        assert all(torch.equal(after[k], before[k]) for k in before), cond
        cfg = adapters.read_adapter_config(b_dir)
        assert cfg["rank"] == rank and cfg["base_hash"] == bh and cfg["condition"] == cond


def test_comfyui_head_layout_check():
    """The head layout ComfyUI would build (its model table: 8 heads for the SD 1.5 shape, else
    64-channel heads) against the base's own."""
    assert convert.comfyui_head_mismatch(convert.SD15_LDM_KWARGS) is None
    other = convert.comfyui_head_mismatch({**convert.SD15_LDM_KWARGS, "num_heads": 4})
    assert "8 heads (its SD 1.5 entry)" in other and "[4, 4, 4, 4]" in other and "computes another network" in other
    wide = dict(model_channels=64, channel_mult=[1, 2, 2, 2], attention_resolutions=[4, 2, 1], num_heads=-1,
                num_head_channels=64, context_dim=32)
    assert convert.comfyui_head_mismatch(wide) is None
    assert "computes another network" in convert.comfyui_head_mismatch({**wide, "num_head_channels": 32})
    tiny = convert.comfyui_head_mismatch(tiny_ldm_kwargs())
    assert "[0, 0, 0, 0] heads at widths [32, 32, 32, 32]" in tiny and "fails to load it" in tiny


def test_alpha_other_than_rank_is_folded_into_up(tmp_path):
    model = tiny_reference_model()
    adapters.add_adapter(model, "x", rank=4, alpha=8)
    randomize_adapter(model, "x", seed=4)
    tensors = adapters.adapter_state_dict(model, "x")
    names = convert.published_names(model)
    folded = convert.export_adapter(model, tensors, alpha=8)
    plain = convert.export_adapter(model, tensors)
    for name, t in tensors.items():
        want = t * 2 if name.endswith("lora_B.weight") else t
        assert torch.equal(folded[names[name]], want), name
        assert torch.equal(plain[names[name]], t), name


def test_names_shapes_order_and_values_match_the_reference_files(tmp_path, capsys):
    """The fixture's base and adapters, imported and exported again: the adapter files equal the
    reference files (names, order, values, both formats); the base file equals it except for the
    values of its stale LoRA set (zeros here)."""
    model = tiny_reference_model()
    kwargs, overrides = convert.ldm_config_from_controlnet(model.config)
    ref_kwargs = tiny_ldm_kwargs()
    assert overrides == {}
    assert {k: v for k, v in kwargs.items() if k in ref_kwargs} == {k: v for k, v in ref_kwargs.items()
                                                                    if k != "use_checkpoint"}

    base_ref = convert.read_state_dict(REF / "tiny_base.ckpt")  # .ckpt keeps the module order
    weights, _ = convert.convert_base(base_ref, model)
    model.load_state_dict(weights, strict=True)
    ours = convert.export_base(model, stale_rank=4)
    assert list(ours) == list(base_ref)
    for k, v in base_ref.items():
        assert v.shape == ours[k].shape, k
        assert torch.equal(ours[k], torch.zeros_like(v) if "lora_layer" in k else v), k
    no_stale = convert.export_base(model, stale_rank=0)
    assert list(no_stale) == [k for k in base_ref if "lora_layer" not in k]
    assert len(no_stale) == 320

    model.save_pretrained(tmp_path / "base")
    bh = adapters.base_hash(model)
    for name in ("tiny_adapter", "tiny_adapter2"):
        ref = convert.read_state_dict(REF / f"{name}.ckpt")
        tensors, rank = convert.convert_adapter(ref, model)
        exported = convert.export_adapter(model, tensors)
        assert len(exported) == 246 and list(exported) == list(ref)
        assert all(torch.equal(exported[k], ref[k]) for k in ref), name
        adapters.save_adapter_tensors(tensors, tmp_path / name, name, rank, rank, bh, model)

    for fmt in ("ckpt", "safetensors"):
        out = tmp_path / f"out-{fmt}"
        assert _export(tmp_path / "base", out, tmp_path / "tiny_adapter", tmp_path / "tiny_adapter2", fmt=fmt) == 0
        capsys.readouterr()
        for name in ("tiny_adapter", "tiny_adapter2"):
            if fmt == "ckpt":
                got = torch.load(out / f"{name}.ckpt", weights_only=True)
                ref = torch.load(REF / f"{name}.ckpt", weights_only=True)
                assert list(got) == list(ref)
            else:
                got, ref = load_file(str(out / f"{name}.safetensors")), load_file(str(REF / f"{name}.safetensors"))
            assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), (fmt, name)
        base = convert.read_state_dict(out / f"base.{fmt}")
        assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in base_ref.items()}


def test_sd15_sized_export_matches_the_official_key_list():
    """SD 1.5 sizes on the meta device (no weights): the exported base file (with a rank-128
    stale set) and adapter file have exactly the official names, shapes, order and counts."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = CtrLoRAControlNet(**convert.controlnet_config_from_ldm(convert.SD15_LDM_KWARGS))
    base = convert.export_base(model, stale_rank=128)
    assert list(base) == list(SD15["base_file"])
    assert {k: list(v.shape) for k, v in base.items()} == SD15["base_file"]
    assert sum(v.numel() for v in base.values()) == SD15["param_counts"]["base_file_total"]
    layout = adapters.adapter_layout(model, 128)
    adapter = convert.export_adapter(model, {k: torch.empty(s, device="meta") for k, s in layout.items()})
    assert list(adapter) == list(SD15["adapter_file"])
    assert {k: list(v.shape) for k, v in adapter.items()} == SD15["adapter_file"]
    assert sum(v.numel() for v in adapter.values()) == SD15["param_counts"]["adapter_total"]
    kwargs, overrides = convert.ldm_config_from_controlnet(model.config)
    assert overrides == {} and {k: kwargs[k] for k in convert.SD15_LDM_KWARGS} == convert.SD15_LDM_KWARGS


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-src")
    _save_folders(root, tiny_reference_model(), [("lighting", 2, 5)])
    return root


def _one_error_line(err: str, *must: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("ctrlora export: error: "), err
    for text in must:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir(parents=True)
    (dst / adapters.ADAPTER_WEIGHTS).write_bytes((src / adapters.ADAPTER_WEIGHTS).read_bytes())
    cfg = json.loads((src / adapters.ADAPTER_CONFIG).read_text())
    (dst / adapters.ADAPTER_CONFIG).write_text(json.dumps({**cfg, **config_changes}))
    return dst


def test_missing_or_wrong_folders(folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert _export(tmp_path / "nope", out) == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "nope"), "base folder not found")
    (tmp_path / "empty").mkdir()
    assert _export(tmp_path / "empty", out) == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "empty"), "not a base ControlNet folder", "config.json")
    assert _export(folders / "base", out, tmp_path / "gone") == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "gone"), "adapter folder not found")
    assert _export(folders / "base", out, tmp_path / "empty") == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "empty"), "not an adapter folder", "adapter_config.json")
    assert not out.exists()


def test_adapter_of_another_base_is_refused(folders, tmp_path, capsys):
    other = _copy_adapter(folders / "adapters" / "lighting", tmp_path / "other", base_hash="0" * 64)
    out = tmp_path / "out"
    assert _export(folders / "base", out, other) == 2
    _one_error_line(capsys.readouterr().err, str(other), "trained on another base", "0" * 64)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_adapter_tensors_that_do_not_fit_the_base(folders, tmp_path, capsys):
    """Right hash, wrong tensors (an adapter of another shape): refused while writing, and the
    half-written export is removed."""
    model = _two_level_model()
    adapters.add_adapter(model, "x", rank=2)
    tensors = adapters.adapter_state_dict(model, "x")
    from safetensors.torch import save_file

    bad = _copy_adapter(folders / "adapters" / "lighting", tmp_path / "bad")
    save_file(tensors, str(bad / adapters.ADAPTER_WEIGHTS))
    out = tmp_path / "out"
    assert _export(folders / "base", out, bad) == 2
    _one_error_line(capsys.readouterr().err, str(bad), "do not match the base's rank-2 adapter layout")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_condition_names_and_output_folder(folders, tmp_path, capsys):
    lighting = folders / "adapters" / "lighting"
    out = tmp_path / "out"
    assert _export(folders / "base", out, lighting, lighting) == 2
    _one_error_line(capsys.readouterr().err, "['lighting']", "several adapter folders")
    named_base = _copy_adapter(lighting, tmp_path / "b", condition="base")
    assert _export(folders / "base", out, named_base) == 2
    _one_error_line(capsys.readouterr().err, str(named_base / adapters.ADAPTER_CONFIG), "cannot name an exported file")
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _export(folders / "base", out, lighting) == 2
    _one_error_line(capsys.readouterr().err, str(out), "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _export(folders / "base", tmp_path / "o2", extra=["--stale-rank", "-1"]) == 2
    _one_error_line(capsys.readouterr().err, "--stale-rank")


def test_hint_cnn_base_has_no_published_layout(tmp_path, capsys):
    torch.manual_seed(0)
    model = CtrLoRAControlNet(condition_embedding="cnn", block_out_channels=(32, 32),
                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
                              attention_head_dim=2, cross_attention_dim=32, conditioning_embedding_out_channels=(16, 32))
    model.save_pretrained(tmp_path / "base")
    assert _export(tmp_path / "base", tmp_path / "out") == 2
    _one_error_line(capsys.readouterr().err, str(tmp_path / "base"), "cannot be written in the published layout",
                    "hint CNN")
    assert not (tmp_path / "out").exists()
