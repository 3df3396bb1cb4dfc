"""Model tests on the tiny dental preset: backbone, ControlNet, adapters (CPU, seconds)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from _models_helpers import randomize_adapter, residuals, tiny_test_config, tiny_vocab

from ctrlora.models import adapters
from ctrlora.models.backbone import Backbone, backbone_hash, build_tiny_backbone, load_backbone
from ctrlora.models.controlnet import CtrLoRAControlNet
from ctrlora.models.latents import (LOGVAR_MAX, LOGVAR_MIN, encode_condition, encode_posterior, encode_text,
                                    sample_latent, tokenize)

RANK = 4


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return build_tiny_backbone(tiny_test_config(), tiny_vocab())


@pytest.fixture(scope="module")
def saved_backbone(backbone, tmp_path_factory):
    path = tmp_path_factory.mktemp("backbone")
    backbone.save(path)
    return path


@pytest.fixture(scope="module")
def inputs(backbone):
    g = torch.Generator().manual_seed(0)
    ids = backbone.tokenizer(["upper molar photo", "lower incisor"], padding="max_length",
                             max_length=backbone.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = backbone.text_encoder(ids).last_hidden_state
    return dict(
        cond=torch.randn(2, 4, 16, 16, generator=g),
        noisy=torch.randn(2, 4, 16, 16, generator=g),
        t=torch.tensor([999, 17]),
        ctx=ctx,
    )


def _cn(backbone, **kw) -> CtrLoRAControlNet:
    torch.manual_seed(0)
    return CtrLoRAControlNet.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor, **kw).eval()


def _randomize_base(model, seed=1):
    """Non-zero zero convs (and a perturbed base) so residuals are informative."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapters.base_parameters(model).items():
            if name.startswith("controlnet_"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _run(model, x, **kw):
    with torch.no_grad():
        return residuals(model(x["cond"], x["t"], x["ctx"], **kw))


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


# ---------------------------------------------------------------------- backbone
def test_tiny_backbone_save_load_and_hash(backbone, saved_backbone, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    loaded = load_backbone(saved_backbone)
    for part in ("vae", "unet", "text_encoder"):
        a, b = getattr(backbone, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    assert loaded.vae_scale_factor == 4
    z = loaded.vae.encode(torch.rand(1, 3, 64, 64)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 16, 16)
    h1 = backbone_hash(saved_backbone)
    assert h1 == backbone_hash(saved_backbone) and len(h1) == 64
    cfg = saved_backbone / "scheduler" / "scheduler_config.json"
    original = cfg.read_text()
    try:
        cfg.write_text(original.replace("1000", "999"))
        assert backbone_hash(saved_backbone) != h1
    finally:
        cfg.write_text(original)


def test_missing_backbone_parts_are_listed(saved_backbone, tmp_path):
    import shutil

    partial = tmp_path / "bb"
    shutil.copytree(saved_backbone, partial)
    shutil.rmtree(partial / "tokenizer")
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_backbone(partial)
    assert "tokenizer/tokenizer.json" in str(err.value) and "unet/diffusion_pytorch_model.safetensors" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "nowhere")


def test_tokenizer_loads_through_autotokenizer(saved_backbone):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(saved_backbone / "tokenizer", local_files_only=True)
    assert tok.model_max_length == 32
    ids = tok("Upper molar, gum!", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 32 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:7]) == ["upper", "molar", ",", "gum", "!", "<|endoftext|>"]
    assert tok.unk_token_id not in ids
    assert ids[7:] == [tok.pad_token_id] * 25


# ---------------------------------------------------------------------- ControlNet
def test_zero_initialised_controlnet_leaves_unet_unchanged(backbone, inputs):
    cn = _cn(backbone)
    out = cn(inputs["cond"], inputs["t"], inputs["ctx"])
    assert len(out.down_block_res_samples) == len(cn.controlnet_down_blocks) == 9
    assert all(torch.count_nonzero(r) == 0 for r in out.down_block_res_samples)
    with torch.no_grad():
        plain = backbone.unet(inputs["noisy"], inputs["t"], inputs["ctx"]).sample
        ctrl = backbone.unet(inputs["noisy"], inputs["t"], inputs["ctx"],
                             down_block_additional_residuals=out.down_block_res_samples,
                             mid_block_additional_residual=out.mid_block_res_sample).sample
    assert torch.equal(plain, ctrl)
    # the encoder half is copied from the UNet
    for k, v in backbone.unet.down_blocks.state_dict().items():
        assert torch.equal(cn.down_blocks.state_dict()[k], v)


def test_timestep_embedding_is_ldm_cos_sin():
    cn = CtrLoRAControlNet(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           cross_attention_dim=16, attention_head_dim=4)
    t = torch.tensor([0, 17, 999])
    half = 16
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    ldm = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(cn.time_proj(t), ldm, atol=1e-6, rtol=0)


def test_vae_mode_ignores_noisy_latent_and_cnn_mode_uses_it(backbone, inputs):
    cn = _cn(backbone)
    _randomize_base(cn)
    a = _run(cn, inputs, sample=inputs["noisy"])
    b = _run(cn, inputs, sample=torch.zeros_like(inputs["noisy"]))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert cn.controlnet_cond_embedding is None

    cnn = _cn(backbone, condition_embedding="cnn")
    _randomize_base(cnn)
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        r1 = residuals(cnn(image, inputs["t"], inputs["ctx"], sample=inputs["noisy"]))
        r2 = residuals(cnn(image, inputs["t"], inputs["ctx"], sample=torch.zeros_like(inputs["noisy"])))
    assert _max_diff(r1, r2) > 1e-3
    with pytest.raises(ValueError, match="noisy latent"):
        cnn(image, inputs["t"], inputs["ctx"])


def test_conditioning_scale_is_linear(backbone, inputs):
    cn = _cn(backbone)
    _randomize_base(cn)
    one = _run(cn, inputs)
    half = _run(cn, inputs, conditioning_scale=0.5)
    per_sample = _run(cn, inputs, conditioning_scale=torch.tensor([2.0, 0.0]))
    assert _max_diff(half, [r * 0.5 for r in one]) == 0.0
    assert all(torch.equal(p[0], 2 * q[0]) and torch.count_nonzero(p[1]) == 0 for p, q in zip(per_sample, one))


def test_encode_condition_samples_the_posterior_afresh(backbone):
    images = torch.rand(2, 3, 64, 64)
    a, b = encode_condition(backbone.vae, images), encode_condition(backbone.vae, images)
    assert not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(encode_condition(backbone.vae, images, g1), encode_condition(backbone.vae, images, g2))
    with torch.no_grad():
        dist = backbone.vae.encode(images).latent_dist
    g = torch.Generator().manual_seed(4)
    z = sample_latent(dist.mean, dist.logvar, 0.5, g)
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(z, (dist.mean + dist.std * noise) * 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_condition(backbone.vae, images * 2 - 1)


def test_sample_latent_clamps_the_log_variance_as_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    mean = torch.zeros(2, 4, 3, 3)
    logvar = torch.linspace(-60.0, 40.0, mean.numel()).view(mean.shape)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert float(dist.logvar.min()) == LOGVAR_MIN and float(dist.logvar.max()) == LOGVAR_MAX
    # the raw (cached) log-variance and diffusers' clamped one give the same sample
    torch.testing.assert_close(sample_latent(mean, logvar, 1.0, noise=noise), dist.mean + dist.std * noise)
    torch.testing.assert_close(sample_latent(mean, logvar, 0.5, noise=noise),
                               sample_latent(mean, dist.logvar, 0.5, noise=noise))
    with pytest.raises(ValueError, match="noise has shape"):
        sample_latent(mean, logvar, 1.0, noise=noise[:1])


def test_encode_posterior_and_text_do_not_depend_on_the_batch_size(backbone):
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean, logvar = encode_posterior(backbone.vae, images, batch_size=2)
    whole = encode_posterior(backbone.vae, images, batch_size=None, out_device=None)
    assert mean.device.type == "cpu" and mean.shape == whole[0].shape
    torch.testing.assert_close(mean, whole[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, whole[1], rtol=1e-5, atol=1e-5)
    captions = ["upper molar photo", "lower incisor", "", "teeth"]
    ids = tokenize(backbone.tokenizer, captions)
    assert ids.shape == (4, backbone.tokenizer.model_max_length)
    states = encode_text(backbone.text_encoder, backbone.tokenizer, captions, batch_size=3)
    with torch.no_grad():
        direct = backbone.text_encoder(ids)[0]
    torch.testing.assert_close(states, direct, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- adapters
def test_new_adapter_starts_at_base_and_switching_changes_output(backbone, inputs):
    cn = _cn(backbone)
    _randomize_base(cn)
    base = _run(cn, inputs)
    adapters.add_adapter(cn, "seg", rank=RANK)
    adapters.add_adapter(cn, "depth", rank=RANK)
    adapters.set_adapter(cn, "seg")
    assert _max_diff(_run(cn, inputs), base) == 0.0  # LoRA B = 0, copies = base values
    randomize_adapter(cn, "seg", 1)
    randomize_adapter(cn, "depth", 2)
    seg = _run(cn, inputs)
    adapters.set_adapter(cn, "depth")
    depth = _run(cn, inputs)
    adapters.set_adapter(cn, None)
    assert _max_diff(_run(cn, inputs), base) == 0.0
    assert _max_diff(seg, base) > 1e-2 and _max_diff(depth, seg) > 1e-2
    adapters.set_adapter(cn, "seg")
    assert _max_diff(_run(cn, inputs), seg) == 0.0
    # peft LoRA scale is alpha / r = 1, as in the reference
    lin = dict(cn.named_modules())["time_embedding.linear_1"]
    assert lin.scaling["seg"] == 1.0


def test_adapter_save_load_round_trip(backbone, inputs, tmp_path):
    cn = _cn(backbone)
    _randomize_base(cn)
    adapters.add_adapter(cn, "normal", rank=RANK)
    randomize_adapter(cn, "normal", 3)
    expected = _run(cn, inputs)
    bh = adapters.base_hash(cn)
    adapters.save_adapter(cn, "normal", tmp_path / "normal", base_hash=bh)
    cfg = json.loads((tmp_path / "normal" / "adapter_config.json").read_text())
    assert cfg["rank"] == RANK and cfg["alpha"] == RANK and cfg["base_hash"] == bh
    assert len(cfg["target_modules"]) == 60 and len(cfg["modules_to_save"]) == 10 + 20
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "normal" / "adapter_model.safetensors"))
    assert set(saved) == set(adapters.adapter_layout(cn, RANK))  # only this adapter's tensors

    # base via save_pretrained (adapters excluded), adapter via load_adapter
    cn.save_pretrained(tmp_path / "base")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "base" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "modules_to_save" in k or "base_layer" in k for k in keys)
    fresh = CtrLoRAControlNet.from_pretrained(tmp_path / "base").eval()
    assert adapters.base_hash(fresh) == bh
    adapters.load_adapter(fresh, tmp_path / "normal")
    assert adapters.active_adapter(fresh) == "normal"
    got = adapters.adapter_state_dict(fresh, "normal")
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert _max_diff(_run(fresh, inputs), expected) == 0.0


_SAVE_IN_A_PROCESS = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
from _models_helpers import randomize_adapter, tiny_test_config, tiny_vocab
from ctrlora.models import adapters
from ctrlora.models.backbone import build_tiny_backbone
from ctrlora.models.controlnet import CtrLoRAControlNet
torch.manual_seed(0)
bb = build_tiny_backbone(tiny_test_config(), tiny_vocab())
cn = CtrLoRAControlNet.from_unet(bb.unet, vae_scale_factor=bb.vae_scale_factor)
adapters.add_adapter(cn, "normal", rank=4)
randomize_adapter(cn, "normal", 3)
adapters.save_adapter(cn, "normal", sys.argv[1], base_hash=adapters.base_hash(cn))
"""


def test_saved_adapter_bytes_are_the_same_in_every_process(tmp_path):
    """The same adapter saved by separate processes is the same file, byte for byte, so DVC hashes
    a retrained identical adapter as unchanged (safetensors writes a metadata map of several keys
    in a per-process random order)."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open

    helpers = str(Path(__file__).resolve().parent.parent)
    outs = [tmp_path / f"run{i}" for i in range(3)]
    for out in outs:
        subprocess.run([sys.executable, "-c", _SAVE_IN_A_PROCESS, str(out), helpers], check=True,
                       capture_output=True, text=True, timeout=120)
    files = [(o / "adapter_model.safetensors").read_bytes() for o in outs]
    assert files[0] == files[1] == files[2]
    with safe_open(str(outs[0] / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["ctrlora"])
    assert meta == {"condition": "normal", "format": adapters.FORMAT}


def test_load_refuses_wrong_base_rank_or_keys(backbone, tmp_path):
    cn = _cn(backbone)
    adapters.add_adapter(cn, "edge", rank=RANK)
    adapters.save_adapter(cn, "edge", tmp_path / "edge", base_hash=adapters.base_hash(cn))
    other = _cn(backbone)
    _randomize_base(other, seed=9)
    with pytest.raises(ValueError, match="trained on base"):
        adapters.load_adapter(other, tmp_path / "edge")
    with pytest.raises(ValueError, match="trained on base"):
        adapters.load_adapter(_cn(backbone), tmp_path / "edge", expected_base_hash="0" * 64)
    with pytest.raises(ValueError, match="rank 4, expected 8"):
        adapters.load_adapter(_cn(backbone), tmp_path / "edge", expected_rank=8)
    # config claims another rank than the tensors
    cfg_path = tmp_path / "edge" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "rank": 8}))
    with pytest.raises(ValueError, match="rank"):
        adapters.load_adapter(_cn(backbone), tmp_path / "edge")
    cfg_path.write_text(json.dumps(cfg))
    # a missing tensor is named
    from safetensors.torch import load_file, save_file

    wpath = tmp_path / "edge" / "adapter_model.safetensors"
    t = load_file(str(wpath))
    del t["controlnet_mid_block.bias"]
    save_file(t, str(wpath))
    target = _cn(backbone)
    with pytest.raises(ValueError, match="controlnet_mid_block.bias"):
        adapters.load_adapter(target, tmp_path / "edge")
    assert adapters.list_adapters(target) == {}  # nothing half-loaded


def test_requires_grad_for_both_modes(backbone):
    cn = _cn(backbone)
    adapters.add_adapter(cn, "canny", rank=RANK, own_modules=False)  # a base condition
    adapters.add_adapter(cn, "depth", rank=RANK, own_modules=False)
    adapters.add_adapter(cn, "lighting", rank=RANK)  # a new condition
    named = dict(cn.named_parameters())
    by_id = {id(p): n for n, p in named.items()}

    params = adapters.set_trainable(cn, "base", adapter="canny")
    train = {by_id[id(p)] for p in params}
    assert train == {n for n, p in named.items() if p.requires_grad}
    assert all(n in train for n in named if ".lora_A.canny." in n or ".lora_B.canny." in n)
    assert not any(".depth." in n or ".lighting." in n for n in train)
    base_names = {by_id[id(p)] for p in adapters.base_parameters(cn).values()}
    assert base_names <= train  # whole base incl. shared zero convs / norms
    assert any(n.startswith("controlnet_mid_block.original_module") for n in train)
    # switching adapters (per step in base training) and adding one never touch the flags
    flags = {n: p.requires_grad for n, p in cn.named_parameters()}
    adapters.set_adapter(cn, "depth")
    adapters.set_adapter(cn, None)
    adapters.add_adapter(cn, "extra", rank=RANK)
    now = {n: p.requires_grad for n, p in cn.named_parameters()}
    assert all(now[n] == f for n, f in flags.items())
    assert not any(now[n] for n in now if ".extra." in n)
    named = dict(cn.named_parameters())
    by_id = {id(p): n for n, p in named.items()}

    params = adapters.set_trainable(cn, "adapter", adapter="lighting")
    train = {by_id[id(p)] for p in params}
    assert train == {n for n, p in named.items() if p.requires_grad}
    assert train == {n for n in named if ".lighting." in n}
    assert any(".modules_to_save.lighting." in n for n in train)
    n_params = sum(p.numel() for p in params)
    assert n_params == adapters.adapter_param_counts(cn, RANK)["total"]

    with pytest.raises(ValueError, match="own_modules=False"):
        adapters.set_trainable(cn, "base", adapter="lighting")
    with pytest.raises(ValueError, match="LoRA-only"):
        adapters.set_trainable(cn, "adapter", adapter="canny")


def test_new_condition_step_leaves_base_bit_identical(backbone, inputs):
    cn = _cn(backbone)
    _randomize_base(cn)
    adapters.add_adapter(cn, "canny", rank=RANK, own_modules=False)
    adapters.add_adapter(cn, "lighting", rank=RANK)
    before = {k: v.clone() for k, v in adapters.base_state_dict(cn).items()}
    other = adapters.adapter_state_dict(cn, "canny")
    mine = adapters.adapter_state_dict(cn, "lighting")
    params = adapters.set_trainable(cn, "adapter", adapter="lighting")
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    cn.train()
    for _ in range(2):
        out = cn(inputs["cond"], inputs["t"], inputs["ctx"])
        loss = sum((r ** 2).mean() for r in residuals(out)) + sum(r.sum() for r in residuals(out))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = adapters.base_state_dict(cn)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(other[k], v) for k, v in adapters.adapter_state_dict(cn, "canny").items())
    new = adapters.adapter_state_dict(cn, "lighting")
    assert sum(not torch.equal(mine[k], new[k]) for k in mine) > len(mine) // 2


def test_base_mode_trains_shared_zero_convs_and_exports_them(backbone, inputs, tmp_path):
    cn = _cn(backbone)
    adapters.add_adapter(cn, "canny", rank=RANK, own_modules=False)
    zc = adapters.base_state_dict(cn)["controlnet_mid_block.weight"].clone()
    params = adapters.set_trainable(cn, "base", adapter="canny")
    opt = torch.optim.SGD(params, lr=0.1)
    out = cn(inputs["cond"], inputs["t"], inputs["ctx"])
    sum(r.sum() for r in residuals(out)).backward()
    opt.step()
    new_zc = adapters.base_state_dict(cn)["controlnet_mid_block.weight"]
    assert not torch.equal(zc, new_zc)
    adapters.save_adapter(cn, "canny", tmp_path / "canny", base_hash=adapters.base_hash(cn))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "canny" / "adapter_model.safetensors"))
    assert torch.equal(saved["controlnet_mid_block.weight"], new_zc)
    assert json.loads((tmp_path / "canny" / "adapter_config.json").read_text())["origin"] == "base-training"


def test_mixed_batch_equals_separate_passes(backbone, inputs):
    cn = _cn(backbone)
    _randomize_base(cn)
    adapters.add_adapter(cn, "canny", rank=RANK, own_modules=False)
    adapters.add_adapter(cn, "seg", rank=RANK)
    adapters.add_adapter(cn, "depth", rank=RANK)
    with torch.no_grad():
        for name in ("canny",):  # LoRA-only: perturb only its LoRA
            for mod in adapters.lora_targets(cn):
                dict(cn.named_modules())[mod].lora_B[name].weight.normal_(0, 0.05)
    # moderate perturbations keep the residuals at a realistic scale (|x| of a few units); the
    # 1e-5 bound is absolute fp32 -- at |x| ~ 30 sub-batch reassociation alone reaches ~4e-5
    randomize_adapter(cn, "seg", 5, scale=0.05)
    randomize_adapter(cn, "depth", 6, scale=0.05)
    names = ["seg", "depth", "__base__", "canny"]
    g = torch.Generator().manual_seed(7)
    conds = torch.randn(len(names) * 2, 4, 16, 16, generator=g)
    ctx = inputs["ctx"].repeat(len(names), 1, 1)
    t = torch.tensor([500] * 8)
    per_sample = [n for n in names for _ in range(2)]
    scale = torch.tensor([1.0, 0.5] * len(names))
    with torch.no_grad():
        adapters.set_adapter(cn, "seg")  # the active adapter must not leak into the mixed batch
        mixed = residuals(cn(conds, t, ctx, conditioning_scale=scale, adapter_names=per_sample))
        separate = []
        for i, n in enumerate(names):
            adapters.set_adapter(cn, n)
            sl = slice(2 * i, 2 * i + 2)
            separate.append(residuals(cn(conds[sl], t[sl], ctx[sl], conditioning_scale=scale[sl])))
    joined = [torch.cat([s[k] for s in separate]) for k in range(len(mixed))]
    diff = _max_diff(mixed, joined)
    magnitude = max(r.abs().max().item() for r in joined)
    print(f"mixed batch vs separate passes: max abs diff {diff:.2e} (max |residual| {magnitude:.2f})")
    assert 0.5 < magnitude < 20
    assert diff <= 1e-5, diff
    assert _max_diff([m[:2] for m in mixed], [m[2:4] for m in mixed]) > 1e-3  # adapters really differ
    # after the block, the model is back to normal single-adapter behaviour
    adapters.set_adapter(cn, "depth")
    with torch.no_grad():
        again = residuals(cn(conds[2:4], t[2:4], ctx[2:4], conditioning_scale=scale[2:4]))
    assert _max_diff(again, separate[1]) == 0.0
    with pytest.raises(KeyError, match="nope"):
        cn(conds, t, ctx, adapter_names=["nope"] * 8)
