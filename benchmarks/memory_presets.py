"""Peak memory and step time of an SD 1.5 adapter training step under the training memory options,
side by side in one run.

The model is the SD 1.5 UNet (config of ``ctrlora.models.sizes``) with ``CtrLoRAControlNet
.from_unet`` and one rank-128 adapter, random weights; inputs come from an in-memory embed cache
(the trainer's real input path, so the VAE and text encoder are never loaded). Every variant is
``train_condition(mode="adapter")`` with one set of ``TrainConfig`` options
(:data:`VARIANTS`), each in a **fresh child process** (ordered ABBA... with ``--rounds 2``):

* ``fp32``        the defaults
* ``ckpt``        ``gradient_checkpointing`` (UNet and ControlNet)
* ``bf16``        ``mixed_precision: bf16``
* ``bf16_ckpt``   bf16 + checkpointing
* ``preset_16gb_no_bnb``  bf16 + checkpointing + frozen UNet in bf16 (``cast_frozen``)
* ``preset_16gb``  the same + 8-bit AdamW (bitsandbytes; recorded as skipped where it is missing)

Memory: CUDA ``torch.cuda.max_memory_allocated`` (peak, weights included) and its increase over
the allocation once the models are on the device; CPU: resident set size sampled every 2 ms
(peak and increase over the RSS after the build). Ratios are against ``fp32``. The JSON also
states the attention processors the UNet runs (diffusers' default: ``AttnProcessor2_0``, i.e.
``torch.nn.functional.scaled_dot_product_attention``) and the parameter / optimiser bytes each
variant implies (what the options save independent of activations).

    python benchmarks/memory_presets.py --device cpu --resolution 64            # here, minutes
    python benchmarks/memory_presets.py --preset tiny --rank 8 --variants fp32,ckpt   # smoke run
    python benchmarks/memory_presets.py --device cuda --resolution 512 --batch 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (StepClock, alternating, check_device, environment, ratio, save_json, set_threads,  # noqa: E402
                     summary, use_device)

CONDITION = "bench"
VARIANTS: dict[str, dict] = {
    "fp32": {},
    "ckpt": {"gradient_checkpointing": True},
    "bf16": {"mixed_precision": "bf16"},
    "bf16_ckpt": {"mixed_precision": "bf16", "gradient_checkpointing": True},
    "preset_16gb_no_bnb": {"memory_preset": "16gb_no_bnb"},
    "preset_16gb": {"memory_preset": "16gb"},
}


def build(resolution: int, device: str, rank: int, seed: int = 0, preset: str = "sd15"):
    """(unet, controlnet with the adapter, scheduler, latent shape, text shape). ``sd15`` is built
    on the meta device and materialised on ``device`` with N(0, 0.02) weights: the values do not
    change memory or time, and this skips a minute of per-layer initialisation of 1.2 G weights.
    ``tiny`` (the smoke run) is the tiny preset of ``params.yaml`` at its own 64 px."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ctrlora.models.adapters import add_adapter
    from ctrlora.models.backbone import SD15_SCHEDULER
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.sizes import SD15_UNET_CONFIG

    if preset == "tiny":
        from adapter_vs_full import build_models

        unet, cn, scheduler, latent, text = build_models("tiny", device, seed)
        cn.requires_grad_(False)
        torch.manual_seed(seed + 1)
        add_adapter(cn, CONDITION, rank=rank, own_modules=True)
        return unet, cn.to(device), scheduler, latent, text
    if resolution % 64:
        raise SystemExit("--resolution must be a multiple of 64 (the UNet halves an 8x smaller latent 3 times)")
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        cn = CtrLoRAControlNet.from_unet(unet, condition_embedding="vae", copy_weights=False, vae_scale_factor=8)
    g = torch.Generator(device=device).manual_seed(seed)
    for m in (unet, cn):
        m.to_empty(device=device)
        with torch.no_grad():
            for t in [*m.parameters(), *m.buffers()]:
                if t.is_floating_point():
                    t.normal_(0.0, 0.02, generator=g)
    unet.eval().requires_grad_(False)
    cn.requires_grad_(False)
    torch.manual_seed(seed + 1)
    add_adapter(cn, CONDITION, rank=rank, own_modules=True)
    side = resolution // 8
    return unet, cn.to(device), DDPMScheduler(**SD15_SCHEDULER), (4, side, side), (77, 768)


def attention_processors(unet) -> list[str]:
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


def implied_bytes(trainable: int, unet_params: int, frozen_cn_params: int, options: dict) -> dict:
    """Bytes of weights, gradients and AdamW state the options imply (no activations): the
    ControlNet's frozen base and the UNet in half precision under ``cast_frozen``, the trained
    parameters in fp32 with their gradients and two moments (8-bit with ``adamw8bit``)."""
    from ctrlora.training.loop import TrainConfig

    cfg = TrainConfig.from_dict(options)
    state = 2 if cfg.optimizer == "adamw8bit" else 8  # two moments, 8-bit or fp32
    frozen = 2 if cfg.cast_frozen else 4
    unet_bytes, cn_bytes = unet_params * frozen, frozen_cn_params * frozen + trainable * 4
    return {"unet_weights": unet_bytes, "controlnet_weights": cn_bytes, "gradients": trainable * 4,
            "optimizer_state": trainable * state,
            "total_mb": round((unet_bytes + cn_bytes + trainable * (4 + state)) / 2**20, 1)}


def run_variant(name: str, device: str, resolution: int, batch: int, steps: int, warmup: int, rank: int,
                seed: int = 0, preset: str = "sd15") -> dict:
    """Build, train ``warmup + steps`` steps with ``VARIANTS[name]``, measure (fresh process)."""
    from adapter_vs_full import measure_memory, precast, synthetic_cache

    from ctrlora.training.controlnet import ControlNetTrainConfig, train_condition
    from ctrlora.training.loop import TrainConfig

    options = VARIANTS[name]
    try:
        cfg = ControlNetTrainConfig(TrainConfig.from_dict(
            {"max_steps": warmup + steps, "batch_size": batch, "learning_rate": 1e-5, "log_every": 1, "seed": seed,
             **options}), prompt_dropout=0.3)
        if cfg.train.optimizer == "adamw8bit":
            import bitsandbytes  # noqa: F401
    except ImportError as exc:
        return {"variant": name, "options": options, "skipped": str(exc)}
    t0 = time.perf_counter()
    unet, cn, scheduler, latent, text = build(resolution, device, rank, seed, preset)
    precast("adapter", cfg, cn, unet)  # the peak of training, not of the fp32 weights before the cast
    unet_params = sum(p.numel() for p in unet.parameters())
    cache = synthetic_cache(latent, text, rows=max(batch, 4), seed=seed)
    build_s = time.perf_counter() - t0
    clock = StepClock(cuda=device == "cuda")
    mem = measure_memory(device, lambda: train_condition(cn, unet, scheduler, cache, CONDITION, cfg, mode="adapter",
                                                         on_log=clock))
    trainable = sum(p.numel() for p in cn.parameters() if p.requires_grad)
    frozen_cn = sum(p.numel() for p in cn.parameters() if not p.requires_grad)
    times = clock.step_times(warmup)
    return {
        "variant": name, "options": options, "preset": preset, "device": device,
        "resolution": resolution if preset == "sd15" else 64, "batch": batch,
        "rank": rank, "trainable_params": trainable, "unet_params": unet_params,
        "attention_processors": attention_processors(unet),
        "unet_dtype_after": str(next(unet.parameters()).dtype),
        "implied_bytes": implied_bytes(trainable, unet_params, frozen_cn, options),
        "controlnet_dtypes": sorted({str(p.dtype) for p in cn.parameters()}),
        "step_s": summary(times)["median_s"], "step_stats": summary(times), "memory": mem,
        "losses": [round(x, 6) for x in clock.losses], "build_s": round(build_s, 2),
        "environment": environment(device),
    }


def _child(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--preset", args.preset, "--device", args.device,
           "--resolution", str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rank", str(args.rank), "--seed", str(args.seed)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"variant {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def compare(runs: dict[str, list[dict]]) -> dict:
    import statistics

    out, ref = {}, None
    for name, rs in runs.items():
        if "skipped" in rs[0]:
            out[name] = {"skipped": rs[0]["skipped"], "options": rs[0]["options"]}
            continue
        out[name] = {"options": rs[0]["options"], "step_s": statistics.median(r["step_s"] for r in rs),
                     "peak_mem_mb": max(r["memory"]["peak_mb"] for r in rs),
                     "mem_delta_mb": max(r["memory"]["delta_mb"] for r in rs),
                     "implied_mb": rs[0]["implied_bytes"]["total_mb"], "runs": rs}
    ref = out.get("fp32")
    for name, v in out.items():
        if "skipped" in v or not ref or "skipped" in ref:
            continue
        v["ratios_over_fp32"] = {k: ratio(v[k], ref[k]) for k in ("step_s", "peak_mem_mb", "mem_delta_mb")}
    first = next(rs[0] for rs in runs.values() if "skipped" not in rs[0])
    return {"benchmark": "memory_presets", "preset": first["preset"], "device": first["device"], "resolution": first["resolution"],
            "batch": first["batch"], "rank": first["rank"], "trainable_params": first["trainable_params"],
            "attention_processors": first["attention_processors"], "memory_method": first["memory"]["method"],
            "environment": first["environment"], "variants": out}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("sd15", "tiny"), default="sd15",
                   help="sd15 (the measurement) or tiny (the params.yaml tiny preset at 64 px: a smoke run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (latent = side / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (>= 1; memory counts them)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", choices=tuple(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        use_device(args.device)
        check_device(args.device)
        set_threads(args.device, args.threads)
        res = run_variant(args.child, args.device, args.resolution, args.batch, args.steps, args.warmup, args.rank,
                          args.seed, args.preset)
        print(json.dumps(res))
        return res
    result = compare(alternating(args.variants.split(","), args.rounds, lambda n: _child(n, args)))
    print(save_json(result, args.out))
    return result


if __name__ == "__main__":
    main()
