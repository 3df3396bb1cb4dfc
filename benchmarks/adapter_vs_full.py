"""Adapter training (base frozen, one adapter trains) against full ControlNet training: trainable
parameters, step time and peak memory, side by side in one run.

The models are built from config with random weights (timing and memory do not depend on the
values): ``--preset sd15`` = the SD 1.5 UNet config of ``ctrlora.models.sizes`` at 512x512
(64x64x4 latents, 77x768 text states), ``--preset tiny`` = the tiny backbone preset as
``params.yaml`` ``backbone.tiny`` sizes it, which runs on a CPU in seconds. The ControlNet is
``CtrLoRAControlNet.from_unet(unet)``; the adapter variant adds one adapter (``--rank``, default 128
at SD scale) and trains only it, the full variant trains every ControlNet weight. Both go through
the project's trainer, ``ctrlora.training.controlnet.train_condition(mode="adapter"|"full")``
(AdamW, clipping, accelerate autocast for ``--dtype bf16|fp16``), fed by an in-memory embed cache
of random posteriors and text states (the trainer's real input path).

Each variant runs in a fresh child process, so one variant's memory cannot hide the other's:

* CUDA: ``torch.cuda.max_memory_allocated`` from just after the models are on the GPU (peak,
  absolute) and its increase over that point (``mem_delta_mb``: gradients, optimiser state,
  activations);
* CPU: resident set size, sampled every 2 ms by a ``psutil`` thread (without psutil: the
  ``ru_maxrss`` high-water mark), likewise absolute and as the increase over the RSS after the
  models are built.

Step times: the trainer's ``on_log`` (``log_every=1``) stamps the end of every step; the first
``--warmup`` steps are dropped, the median of the rest is reported.

    python benchmarks/adapter_vs_full.py --preset tiny --device cpu
    python benchmarks/adapter_vs_full.py --preset sd15 --device cuda --dtype bf16 --batch 8
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (StepClock, alternating, check_device, environment, mixed_precision, ratio, set_threads,  # noqa: E402
                     save_json, summary, use_device)

VARIANTS = ("adapter", "full")
CONDITION = "bench"
PRESETS = {
    # resolution, latent side, default batch, default rank
    "sd15": dict(resolution=512, batch=4, rank=128),
    "tiny": dict(resolution=64, batch=8, rank=16),
}


# ---------------------------------------------------------------------- models and inputs
def build_models(preset: str, device: str = "cpu", seed: int = 0):
    """(unet, controlnet, scheduler, latent_shape (C, h, w), text_shape (L, D)), random weights."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ctrlora.models.backbone import SD15_SCHEDULER, build_tiny_backbone, tiny_backbone_config
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.models.sizes import SD15_UNET_CONFIG

    torch.manual_seed(seed)
    if preset == "sd15":
        with torch.device(device):  # build in place: no 3 GB detour through host memory on a GPU
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
            cn = CtrLoRAControlNet.from_unet(unet, condition_embedding="vae", vae_scale_factor=8)
        latent = (4, 64, 64)
        text = (77, 768)
        sched = dict(SD15_SCHEDULER)
    elif preset == "tiny":
        cfg = tiny_backbone_config(seed=seed)
        bb = build_tiny_backbone(cfg, ["upper", "lower", "jaw", "molar"])
        unet = bb.unet.to(device)
        cn = CtrLoRAControlNet.from_unet(unet, condition_embedding="vae", vae_scale_factor=bb.vae_scale_factor)
        side = cfg.image_size // bb.vae_scale_factor
        latent = (cfg.latent_channels, side, side)
        text = (cfg.max_length, cfg.cross_attention_dim)
        sched = dict(cfg.scheduler)
        del bb
    else:
        raise SystemExit(f"unknown preset {preset!r}; choose sd15 or tiny")
    unet.eval().requires_grad_(False)
    return unet, cn.to(device), DDPMScheduler(**sched), latent, text


def synthetic_cache(latent: tuple, text: tuple, rows: int, seed: int = 0):
    """An in-memory embed cache of ``rows`` random pairs (the trainer's input path)."""
    import torch

    from ctrlora.training.embed import ConditionEmbeds, EmbedCache

    g = torch.Generator().manual_seed(seed)
    mean = lambda: torch.randn((rows, *latent), generator=g)  # noqa: E731
    logvar = torch.full((rows, *latent), -6.0)
    cond = ConditionEmbeds(torch.arange(rows, dtype=torch.long), mean(), logvar.clone())
    return EmbedCache([f"r{i}" for i in range(rows)], ["train"] * rows, [""] * rows, 0.18215, mean(), logvar,
                      torch.randn((rows, *text), generator=g), torch.randn((1, *text), generator=g),
                      {CONDITION: cond})


def prepare_variant(variant: str, controlnet, rank: int, seed: int = 0) -> None:
    """Adapter variant: freeze the base and add the condition's adapter (``train_condition`` then
    trains only it). Full variant: nothing to add (``train_condition`` trains every weight)."""
    import torch

    from ctrlora.models.adapters import add_adapter

    if variant == "adapter":
        controlnet.requires_grad_(False)
        torch.manual_seed(seed + 1)
        add_adapter(controlnet, CONDITION, rank=rank, own_modules=True)
    elif variant != "full":
        raise SystemExit(f"variant must be one of {VARIANTS}, got {variant!r}")


def train_config(batch: int, steps: int, mp: str, seed: int = 0, memory_preset: str | None = None):
    """The trainer's settings; ``memory_preset`` (``TrainConfig``'s presets) replaces ``mp``."""
    from ctrlora.training.controlnet import ControlNetTrainConfig
    from ctrlora.training.loop import TrainConfig

    opts = {"memory_preset": memory_preset} if memory_preset else {"mixed_precision": mp}
    return ControlNetTrainConfig(TrainConfig.from_dict({"max_steps": steps, "batch_size": batch, "learning_rate": 1e-5,
                                                        "log_every": 1, "seed": seed, **opts}), prompt_dropout=0.3)


def precast(variant: str, cfg, controlnet, unet) -> None:
    """With ``cast_frozen``, store the frozen weights in half precision before the memory baseline
    is taken, as a user loading the models in bf16 would (the trainer's own cast is then a no-op):
    otherwise the peak is the fp32 weights before the cast, not the training step."""
    from ctrlora.models.adapters import set_trainable
    from ctrlora.training.controlnet import cast_frozen_weights

    if not cfg.train.cast_frozen:
        return
    if variant == "adapter":
        set_trainable(controlnet, "adapter", CONDITION)
    else:
        controlnet.requires_grad_(True)
    cast_frozen_weights(controlnet, unet, cfg.train.half_dtype)


# ---------------------------------------------------------------------- memory
class HostPeak:
    """Peak resident set size of this process while running (psutil sampler thread), or the
    ``ru_maxrss`` high-water mark where psutil is missing."""

    def __init__(self, interval: float = 0.002):
        import resource

        self._resource = resource
        try:
            import psutil

            self._proc = psutil.Process()
            self.method = "psutil RSS sampled every 2 ms"
        except ImportError:
            self._proc = None
            self.method = "resource.getrusage ru_maxrss (high-water mark)"
        self.interval = interval
        self.baseline = self._now()
        self.peak = self.baseline
        self.maxrss_before = self._maxrss()
        self._stop = threading.Event()
        self._thread = None

    def _maxrss(self) -> int:
        kb = self._resource.getrusage(self._resource.RUSAGE_SELF).ru_maxrss
        return kb * 1024 if sys.platform != "darwin" else kb

    def _now(self) -> int:
        return self._proc.memory_info().rss if self._proc else self._maxrss()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(self.interval)

    def __enter__(self):
        if self._proc:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, self._now())
        self.maxrss_after = self._maxrss()


# ---------------------------------------------------------------------- one variant
def measure_memory(device: str, run) -> dict:
    """Run ``run()`` and return its memory figures (MB): on CUDA the allocator's peak over the
    allocation before it; on CPU the sampled resident set size (see :class:`HostPeak`)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        mem = {"method": "torch.cuda.max_memory_allocated", "baseline_mb": baseline / 2**20,
               "peak_mb": peak / 2**20, "delta_mb": (peak - baseline) / 2**20,
               "max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    else:
        with HostPeak() as host:
            run()
        mem = {"method": host.method, "baseline_mb": host.baseline / 2**20, "peak_mb": host.peak / 2**20,
               "delta_mb": (host.peak - host.baseline) / 2**20,
               "ru_maxrss_before_mb": host.maxrss_before / 2**20, "ru_maxrss_after_mb": host.maxrss_after / 2**20}
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in mem.items()}


def run_variant(variant: str, preset: str = "tiny", device: str = "cpu", dtype: str = "fp32",
                batch: int | None = None, steps: int = 3, warmup: int = 2, rank: int | None = None,
                seed: int = 0, memory_preset: str | None = None) -> dict:
    """Build, train ``warmup + steps`` steps, measure. Meant to run in a fresh process."""
    import torch

    from ctrlora.models.adapters import adapter_param_counts, base_hash
    from ctrlora.training.controlnet import train_condition

    if steps < 1 or warmup < 1:
        raise ValueError("steps and warmup must be >= 1")
    preset_defaults = PRESETS[preset]
    batch = batch or preset_defaults["batch"]
    rank = rank or preset_defaults["rank"]
    mp = mixed_precision(device, dtype)
    t0 = time.perf_counter()
    unet, cn, scheduler, latent, text = build_models(preset, device, seed)
    expected_adapter = adapter_param_counts(cn, rank)
    controlnet_params = sum(p.numel() for p in cn.parameters())
    prepare_variant(variant, cn, rank, seed)
    cache = synthetic_cache(latent, text, rows=max(batch, 8), seed=seed)
    cfg = train_config(batch, warmup + steps, mp, seed, memory_preset)
    precast(variant, cfg, cn, unet)
    hash_before = base_hash(cn)
    build_s = time.perf_counter() - t0
    clock = StepClock(cuda=device == "cuda")

    mem = measure_memory(device, lambda: train_condition(cn, unet, scheduler, cache, CONDITION, cfg, mode=variant,
                                                         on_log=clock))
    trainable = sum(p.numel() for p in cn.parameters() if p.requires_grad)
    hash_after = base_hash(cn)
    times = clock.step_times(warmup)
    return {
        "variant": variant,
        "preset": preset,
        "device": device,
        "dtype": dtype,
        "memory_preset": memory_preset,
        "batch": batch,
        "resolution": preset_defaults["resolution"],
        "latent_shape": list(latent),
        "text_shape": list(text),
        "rank": rank if variant == "adapter" else None,
        "trainable_params": trainable,
        "controlnet_params": controlnet_params,
        "adapter_param_counts": expected_adapter if variant == "adapter" else None,
        "step_s": summary(times)["median_s"],
        "step_stats": summary(times),
        "memory": mem,
        "base_unchanged": hash_before == hash_after,
        "losses": [round(x, 6) for x in clock.losses],
        "build_s": round(build_s, 2),
        "environment": environment(device),
    }


# ---------------------------------------------------------------------- parent: both variants
def _child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--preset", args.preset,
           "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed)]
    for flag in ("batch", "rank", "threads", "memory_preset"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"variant {variant!r} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def compare(runs: dict[str, list[dict]]) -> dict:
    """Merge the children's results (one or more runs per variant) into the report."""
    import statistics

    out = {}
    for v, rs in runs.items():
        first = rs[0]
        out[v] = {
            "trainable_params": first["trainable_params"],
            "step_s": statistics.median(r["step_s"] for r in rs),
            "peak_mem_mb": max(r["memory"]["peak_mb"] for r in rs),
            "mem_delta_mb": max(r["memory"]["delta_mb"] for r in rs),
            "base_unchanged": all(r["base_unchanged"] for r in rs),
            "runs": rs,
        }
    a, f = out["adapter"], out["full"]
    first = runs["adapter"][0]
    return {
        "benchmark": "adapter_vs_full",
        "preset": first["preset"],
        "device": first["device"],
        "dtype": first["dtype"],
        "memory_preset": first.get("memory_preset"),
        "batch": first["batch"],
        "resolution": first["resolution"],
        "latent_shape": first["latent_shape"],
        "rank": first["rank"],
        "controlnet_params": first["controlnet_params"],
        "adapter_param_counts": first["adapter_param_counts"],
        "memory_method": first["memory"]["method"],
        "environment": first["environment"],
        "ratios": {
            "trainable_params_adapter_over_full": ratio(a["trainable_params"], f["trainable_params"]),
            "step_time_adapter_over_full": ratio(a["step_s"], f["step_s"]),
            "peak_mem_adapter_over_full": ratio(a["peak_mem_mb"], f["peak_mem_mb"]),
            "mem_delta_adapter_over_full": ratio(a["mem_delta_mb"], f["mem_delta_mb"]),
        },
        "adapter": a,
        "full": f,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="sd15")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or accelerate mixed precision (autocast; weights stay fp32)")
    p.add_argument("--memory-preset", choices=("16gb", "16gb_no_bnb"), default=None,
                   help="train both variants under this TrainConfig memory preset (replaces --dtype's "
                        "mixed precision): bf16, checkpointing, frozen weights in bf16 (+ 8-bit AdamW)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: sd15 4, tiny 8)")
    p.add_argument("--rank", type=int, default=None, help="adapter LoRA rank (default: sd15 128, tiny 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (>= 1; memory counts them)")
    p.add_argument("--rounds", type=int, default=1, help="child runs per variant, ordered ABBA...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:  # one variant in this (fresh) process; one JSON line on stdout
        use_device(args.device)
        check_device(args.device)
        set_threads(args.device, args.threads)
        res = run_variant(args.child, args.preset, args.device, args.dtype, args.batch, args.steps, args.warmup,
                          args.rank, args.seed, args.memory_preset)
        print(json.dumps(res))
        return res
    mixed_precision(args.device, args.dtype)  # refuse a bad combination before starting children
    result = compare(alternating(list(VARIANTS), args.rounds, lambda v: _child(v, args)))
    print(save_json(result, args.out))
    return result


if __name__ == "__main__":
    main()
