"""The benchmarks at tiny scale: behaviour only (valid JSON, what trains, what is encoded where).
No wall-time assertion: timings belong to benchmarks/README.md, measured side by side."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import adapter_vs_full as avf
from benchmarks import embed_cache as ec

FAST = ["--steps", "2", "--warmup", "1", "--threads", "1"]
# the CLIs set these for their own process; inside pytest they are restored afterwards
CLI_ENV = {"ACCELERATE_USE_CPU": "true", "TQDM_DISABLE": "1"}


def _cli_env(mp: pytest.MonkeyPatch) -> None:
    for k, v in CLI_ENV.items():
        mp.setenv(k, v)


@pytest.fixture(scope="module")
def synthetic_setup():
    torch.set_num_threads(1)
    return ec.build_setup(synthetic=True, condition="lighting", pairs=8, rank=4, device="cpu", seed=0)


def _adapter_snapshot(cn):
    from ctrlora.models.adapters import adapter_state_dict

    return {k: v.detach().clone() for k, v in adapter_state_dict(cn, "lighting").items()}


def _restore_adapter(cn, snap):
    from ctrlora.models.adapters import adapter_tensor_refs

    with torch.no_grad():
        for k, t in adapter_tensor_refs(cn, "lighting").items():
            t.copy_(snap[k])


# ---------------------------------------------------------------------- embed cache
def test_embed_cache_cli_prints_valid_json(capsys, monkeypatch):
    _cli_env(monkeypatch)
    res = ec.main(["--synthetic", "--pairs", "8", "--batch", "4", "--rank", "4", "--rounds", "1", *FAST])
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "embed_cache"
    assert out["step_s"] == res["step_s"]
    for v in ("cached", "on_the_fly"):
        assert out["step_s"][v] > 0
        assert out["stats"][v]["n"] == 2
    assert out["ratio_on_the_fly_over_cached"] > 0
    assert out["order"] == ["cached", "on_the_fly"]
    # the benchmark's own hooks: the cached step never encodes, the on-the-fly step encodes the
    # photo and the condition image (2 VAE encoder calls) and the captions (1 text-encoder call)
    assert out["encoder_calls_per_step"]["cached"] == {"vae_encoder": 0.0, "text_encoder": 0.0}
    assert out["encoder_calls_per_step"]["on_the_fly"] == {"vae_encoder": 2.0, "text_encoder": 1.0}


def test_cached_step_runs_no_vae_encode(synthetic_setup):
    s = synthetic_setup
    calls = {"vae_encoder": 0, "text_encoder": 0}
    hooks = [s.backbone.vae.encoder.register_forward_hook(lambda *_: calls.__setitem__("vae_encoder", calls["vae_encoder"] + 1)),
             s.backbone.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text_encoder", calls["text_encoder"] + 1))]
    try:
        clock = ec.run_cached(s, batch=4, steps=2)
        assert len(clock.stamps) == 2
        assert calls == {"vae_encoder": 0, "text_encoder": 0}
        ec.run_on_the_fly(s, batch=4, steps=2)
        assert calls == {"vae_encoder": 4, "text_encoder": 2}
    finally:
        for h in hooks:
            h.remove()


def test_both_variants_see_the_same_batch(synthetic_setup):
    """From the same weights, step 1 of each variant draws the same pairs, noise and timesteps:
    the losses agree (up to float noise of encoding in a different batch composition)."""
    s = synthetic_setup
    snap = _adapter_snapshot(s.controlnet)
    try:
        fly = ec.run_on_the_fly(s, batch=4, steps=1).losses[0]
        _restore_adapter(s.controlnet, snap)
        cached = ec.run_cached(s, batch=4, steps=1).losses[0]
    finally:
        _restore_adapter(s.controlnet, snap)
    assert cached == pytest.approx(fly, rel=1e-4)


# ---------------------------------------------------------------------- adapter vs full
@pytest.fixture(scope="module")
def variant_results():
    """Both variants through the child entry point (in-process here; the CLI runs each in a fresh
    process for clean memory figures)."""
    torch.set_num_threads(1)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _cli_env(mp)
        for v in avf.VARIANTS:
            out[v] = avf.main(["--child", v, "--preset", "tiny", "--device", "cpu", "--batch", "2", *FAST])
    return out


def test_adapter_vs_full_json_and_counts(variant_results, capsys):
    from ctrlora.models.adapters import adapter_param_counts

    capsys.readouterr()
    report = json.loads(json.dumps(avf.compare({v: [r] for v, r in variant_results.items()})))
    a, f = report["adapter"], report["full"]
    for v in (a, f):
        assert v["step_s"] > 0
        assert v["peak_mem_mb"] > 0 and v["mem_delta_mb"] >= 0
        assert len(v["runs"][0]["losses"]) == 3
    # the adapter variant trains exactly one adapter, the full variant every ControlNet weight
    unet, cn, *_ = avf.build_models("tiny", "cpu")
    expected = adapter_param_counts(cn, 16)
    assert report["adapter_param_counts"] == expected
    assert a["trainable_params"] == expected["total"]
    assert f["trainable_params"] == sum(p.numel() for p in cn.parameters()) == report["controlnet_params"]
    assert a["trainable_params"] < f["trainable_params"]
    assert 0 < report["ratios"]["trainable_params_adapter_over_full"] < 1
    # in-process, after other tests, the full variant's RSS may not grow at all (freed memory is
    # reused), leaving the memory-delta ratio undefined (None); every defined ratio is positive
    ratios = report["ratios"]
    assert all(r > 0 for k, r in ratios.items() if not (k == "mem_delta_adapter_over_full" and r is None))
    # base_unchanged is the benchmark's own hash check: true for the adapter, false for full
    assert a["base_unchanged"] is True and f["base_unchanged"] is False


def test_adapter_variant_keeps_the_base_bit_identical():
    from ctrlora.models.adapters import adapter_state_dict, base_state_dict
    from ctrlora.training.controlnet import train_condition

    torch.set_num_threads(1)
    unet, cn, scheduler, latent, text = avf.build_models("tiny", "cpu", seed=1)
    avf.prepare_variant("adapter", cn, rank=4)
    base = {k: v.clone() for k, v in base_state_dict(cn).items()}
    adapter = {k: v.clone() for k, v in adapter_state_dict(cn, avf.CONDITION).items()}
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    cache = avf.synthetic_cache(latent, text, rows=4)
    cfg = avf.train_config(batch=2, steps=2, mp="no")
    cfg.train.learning_rate = 1e-2
    train_condition(cn, unet, scheduler, cache, avf.CONDITION, cfg, mode="adapter")
    after = base_state_dict(cn)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())
    moved = adapter_state_dict(cn, avf.CONDITION)
    assert any(not torch.equal(moved[k], adapter[k]) for k in adapter), "the adapter did not train"


def test_refusals():
    with pytest.raises(SystemExit, match="fp16 needs --device cuda"):
        avf.main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp16"])
    with pytest.raises(SystemExit):
        ec.parse_args([])  # neither --synthetic nor --prepared/--backbone
