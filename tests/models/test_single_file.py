"""Single-file Stable Diffusion 1.5 (the original ldm layout) into the diffusers folder the graph
reads: ``ctrlora import-sd15`` (:mod:`ctrlora.models.single_file`).

The files are written by :func:`ctrlora.models.single_file.ldm_state_dict` from a random backbone
of SD 1.5's layout. Its names are checked against two oracles: the reference CtrLoRA code's own
SD 1.5 key list (``sd15_keys.json``: the UNet's encoder half, which its ControlNet copies, names
and shapes), and diffusers' single-file conversion, which must place every tensor on a parameter
of the same shape. The fast tests use a narrow SD 1.5 layout (the same blocks, 32-64 channels);
the ``sd15`` test imports a full-size random SD 1.5 (``make test-sd15``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _models_helpers import REF  # noqa: E402

from ctrlora.models import single_file  # noqa: E402
from ctrlora.models.backbone import Backbone, load_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def narrow_sd15(seed: int = 0) -> Backbone:
    """SD 1.5's block layout (4 levels, 2 layers, cross-attention in the first 3, the VAE's 4
    levels) at 32-64 channels, a 2-layer text encoder and a word tokenizer; random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.backbone import SD15_SCHEDULER, build_tokenizer
    from ctrlora.models.sizes import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    tok = build_tokenizer(CAPTION_VOCABULARY, max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "block_out_channels": (32, 32, 64, 64),
                                       "cross_attention_dim": 32, "attention_head_dim": 4, "sample_size": 8})
        vae = AutoencoderKL(**{**SD15_VAE_CONFIG, "block_out_channels": (32, 32, 64, 64), "sample_size": 64})
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                            projection_dim=32, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    for m in (unet, vae, text):
        m.eval()
    return Backbone(vae=vae, unet=unet, text_encoder=text, tokenizer=tok, scheduler=DDPMScheduler(**SD15_SCHEDULER))


def _same_tensors(a: Backbone, b: Backbone) -> None:
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert set(sa) == set(sb), part
        bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
        assert not bad, (part, bad[:5])


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """(original backbone, its diffusers folder = the --config folder, .safetensors, .ckpt)."""
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("single")
    bb = narrow_sd15()
    folder = bb.save(tmp / "diffusers")
    sd = single_file.ldm_state_dict(bb)
    save_file(sd, str(tmp / "narrow.safetensors"))
    # the original .ckpt files wrap the weights: {"state_dict": ..., "global_step": ...}
    torch.save({"state_dict": sd, "global_step": 0}, tmp / "narrow.ckpt")
    return bb, folder, tmp / "narrow.safetensors", tmp / "narrow.ckpt"


def test_the_written_layout_matches_the_reference_sd15_names():
    """At full SD 1.5 size (meta device, no weights): every UNet encoder-half key of the reference
    CtrLoRA's ControlNet (a copy of the ldm UNet's input blocks, middle block and time embedding)
    is a key of the written file under ``model.diffusion_model.``, with the same shape; the file
    has SD 1.5's three parts and nothing the import would refuse."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ctrlora.models.backbone import SD15_SCHEDULER
    from ctrlora.models.sizes import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    with init_empty_weights():
        bb = Backbone(vae=AutoencoderKL(**SD15_VAE_CONFIG), unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
                      text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)), tokenizer=None,
                      scheduler=DDPMScheduler(**SD15_SCHEDULER))
    sd = single_file.ldm_state_dict(bb)
    ref = json.loads((REF / "sd15_keys.json").read_text())["base_file"]
    encoder = {k[len("control_model."):]: v for k, v in ref.items()
               if not any(s in k for s in ("lora_layer", "zero_convs", "middle_block_out", "input_hint_block"))}
    assert len(encoder) == 298  # 488 in the base file, less 164 stale LoRA and 26 zero-conv tensors
    mine = {k[len(single_file.UNET_PREFIX):]: list(v.shape) for k, v in sd.items() if k.startswith(single_file.UNET_PREFIX)}
    assert {k: mine.get(k) for k in encoder} == encoder
    assert len(mine) == len(bb.unet.state_dict()) and any(k.startswith("output_blocks.11.1.") for k in mine)
    vae = [k for k in sd if k.startswith(single_file.VAE_PREFIX)]
    assert len(vae) == len(bb.vae.state_dict())
    assert tuple(sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)  # ldm's 1x1 conv
    parts, ignored = single_file._parts(sd)
    assert ignored == {"position_ids": 1, "betas": 1, "alphas_cumprod": 1}


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_a_single_file_imports_to_the_same_tensors(narrow, tmp_path, fmt):
    bb, folder, st, ckpt = narrow
    report = single_file.import_single_file(st if fmt == "safetensors" else ckpt, folder / "tokenizer",
                                            tmp_path / "out", config_dir=folder)
    assert report["format"] == fmt and report["tensors"]["unet"] == len(bb.unet.state_dict())
    assert report["ignored"] == {"position_ids": 1, "betas": 1, "alphas_cumprod": 1}
    back = load_backbone(tmp_path / "out")
    _same_tensors(bb, back)
    assert back.tokenizer("upper molar").input_ids == bb.tokenizer("upper molar").input_ids
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_the_import_refuses_what_it_cannot_place(narrow, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, st, _ = narrow
    sd = load_file(str(st))
    key = "model.diffusion_model.output_blocks.2.1.conv.weight"  # the first up-sampler
    save_file({k: v for k, v in sd.items() if k != key}, str(tmp_path / "missing.safetensors"))
    # diffusers places the up-sampler's bias only beside its weight: both are named
    with pytest.raises(ValueError, match=r"missing\.safetensors: .*does not place: \['model\.diffusion_model\.output_blocks"
                       r"\.2\.1\.conv\.bias'\]; the file lacks 2 unet parameter.*upsamplers\.0\.conv\.weight"):
        single_file.import_single_file(tmp_path / "missing.safetensors", folder / "tokenizer", tmp_path / "a",
                                       config_dir=folder)
    # a key diffusers cannot place, and one it places on a parameter this UNet lacks (no shortcut
    # where the channels do not change)
    for extra, message in (("output_blocks.2.9.weight", r"does not place: \['model\.diffusion_model\.output_blocks\.2\.9"),
                           ("input_blocks.1.0.skip_connection.weight",
                            r"no unet parameter: \['model\.diffusion_model\.input_blocks\.1\.0\.skip_connection\.weight "
                            r"\(-> down_blocks\.0\.resnets\.0\.conv_shortcut\.weight\)'\]")):
        save_file({**sd, single_file.UNET_PREFIX + extra: torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
        with pytest.raises(ValueError, match=r"extra\.safetensors: .*" + message):
            single_file.import_single_file(tmp_path / "extra.safetensors", folder / "tokenizer", tmp_path / "b",
                                           config_dir=folder)
    wide = {**sd, "first_stage_model.quant_conv.bias": torch.zeros(5)}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"vae shape mismatch.*first_stage_model\.quant_conv\.bias: \(5,\) vs \(8,\)"):
        single_file.import_single_file(tmp_path / "wide.safetensors", folder / "tokenizer", tmp_path / "c",
                                       config_dir=folder)
    # the built-in configs are SD 1.5's full size: the narrow file does not fit them, and says where
    with pytest.raises(ValueError, match=r"narrow\.safetensors: the file lacks 2 unet parameter.*conv_shortcut"):
        single_file.import_single_file(st, folder / "tokenizer", tmp_path / "d")
    assert not any(p.name.startswith((".a", ".b", ".c", ".d", "a", "b", "c", "d")) for p in tmp_path.iterdir())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctrlora.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)


def test_the_command_needs_a_tokenizer_and_says_why(narrow, tmp_path):
    _, folder, st, _ = narrow
    done = _cli("import-sd15", str(st), "--out", str(tmp_path / "o"), "--config", str(folder))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "holds no tokenizer: pass --tokenizer DIR" in done.stderr
    done = _cli("import-sd15", str(st), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and f"{tmp_path}: not a tokenizer folder" in done.stderr
    done = _cli("import-sd15", str(st), "--tokenizer", str(folder / "tokenizer"), "--config", str(folder),
                "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["out"] == str(tmp_path / "o")


def test_the_backbone_stage_names_the_command_for_a_single_file(tmp_path):
    """``backbone.sd15_path`` naming a file: the stage stops, naming the setting and the
    conversion to run once. It runs in a copy of the code (the stage replaces its output folder,
    which must never be this checkout's)."""
    import shutil

    import yaml

    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    ckpt.write_bytes(b"not read")
    root = tmp_path / "project"
    for pkg in ("ctrlora", "pipelines"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["backbone"].update(preset="sd15", sd15_path=str(ckpt))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "pipelines.stages.record_backbone"], cwd=root, timeout=300,
                          env=dict(os.environ, CTRLORA_PARAMS=str(root / "params.yaml")), capture_output=True,
                          text=True)
    assert done.returncode != 0 and not (root / "models" / "backbone").exists()
    assert "single-file checkpoint" in done.stderr and "ctrlora import-sd15" in done.stderr
    assert "backbone.sd15_path" in done.stderr and str(ckpt) in done.stderr


@pytest.mark.sd15
@pytest.mark.timeout(1800)
def test_a_full_size_random_sd15_file_imports(tmp_path):
    """SD 1.5 at full size, built-in configs (no --config): a random SD 1.5 written as one
    .safetensors file imports through the command to the very tensors it was written from."""
    from safetensors.torch import load_file, save_file

    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.sizes import random_sd15_backbone

    bb = random_sd15_backbone(CAPTION_VOCABULARY)
    counts = {p: len(getattr(bb, p).state_dict()) for p in ("unet", "vae", "text_encoder")}
    original = bb.save(tmp_path / "original")
    save_file(single_file.ldm_state_dict(bb), str(tmp_path / "sd15.safetensors"))
    del bb
    done = _cli("import-sd15", str(tmp_path / "sd15.safetensors"), "--tokenizer", str(original / "tokenizer"),
                "--out", str(tmp_path / "imported"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["tensors"] == counts
    (tmp_path / "sd15.safetensors").unlink()
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        a = load_file(str(original / part / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "imported" / part / f"{name}.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part
        del a, b
    load_backbone(tmp_path / "imported")
