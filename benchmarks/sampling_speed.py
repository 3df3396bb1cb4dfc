"""Sampling speed of ``CtrLoRAPipeline``: batched vs sequential multi-condition ControlNet passes at
N = 1, 2, 3 conditions, and images per second at 20 steps, side by side in one process.

Random weights (speed does not depend on the values): ``--preset sd15`` = a random SD 1.5
backbone (:func:`ctrlora.models.sizes.random_sd15_backbone`, built directly on the device) at
``--resolution`` (512), three rank-128 adapters; ``--preset tiny`` = the ``params.yaml`` tiny
preset at 64 px, rank 8 (the smoke run). Conditions are smooth random images.

* ``batched``: ``batch_conditions=True`` (one ControlNet forward over every condition x CFG
  branch per step); ``sequential``: ``batch_conditions=False`` (one forward per condition with its
  adapter switched in, the reference's loop). Both from the same seeds: the JSON records the
  largest difference of the final latents and, after one step, its size relative to the latents
  (they agree to rounding; in bf16 over many CFG steps a random-weight model amplifies that
  rounding, so the one-step figure is the equality check). ``--repeats`` timed calls per mode,
  alternating, the median.
* ``images_per_s``: ``--images`` images of one prompt with N = 1 condition, ``--steps`` DDIM
  steps, CFG 7.5, batched; decode included.

Every timed call follows one untimed warm-up call of the same shape; on CUDA the clock waits for
the device. Ratios: sequential / batched seconds per N.

    python benchmarks/sampling_speed.py --preset sd15 --device cuda --dtype bf16
    python benchmarks/sampling_speed.py --preset tiny --device cpu --steps 2 --images 2   # smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternating, check_device, environment, ratio, save_json, set_threads, use_device  # noqa: E402

VOCABULARY = ["upper", "lower", "jaw", "molar", "photo"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_pipeline(preset: str, device: str, dtype: str, n_adapters: int, rank: int | None, seed: int = 0):
    import torch

    from ctrlora.models.adapters import add_adapter, adapter_tensor_refs, set_adapter
    from ctrlora.models.controlnet import CtrLoRAControlNet
    from ctrlora.sampling import CtrLoRAPipeline

    torch.manual_seed(seed)
    if preset == "sd15":
        from ctrlora.models.sizes import random_sd15_backbone

        with torch.device(device):
            bb = random_sd15_backbone(VOCABULARY, seed=seed)
        rank = rank or 128
    elif preset == "tiny":
        from ctrlora.models.backbone import build_tiny_backbone, tiny_backbone_config

        bb = build_tiny_backbone(tiny_backbone_config(seed=seed), VOCABULARY)
        rank = rank or 8
    else:
        raise SystemExit(f"unknown preset {preset!r}")
    with torch.device(device):
        cn = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae", vae_scale_factor=bb.vae_scale_factor)
        g = torch.Generator(device=device).manual_seed(seed + 1)
        for i in range(n_adapters):
            add_adapter(cn, f"c{i}", rank=rank, own_modules=True)
            with torch.no_grad():  # non-zero, distinct adapters (fresh LoRA B and zero convs are 0)
                for t in adapter_tensor_refs(cn, f"c{i}").values():
                    t.add_(0.01 * torch.randn(t.shape, generator=g, device=t.device))
    set_adapter(cn, None)
    cn.eval()
    pipe = CtrLoRAPipeline.from_components(bb, cn)
    pipe.to(device=device, dtype=getattr(torch, DTYPES[dtype]))
    pipe.set_progress_bar_config(disable=True)
    return pipe, rank


def condition_images(n: int, side: int, seed: int = 0):
    """``n`` smooth random RGB images [1, 3, side, side] in [0, 1]."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    return [F.interpolate(torch.rand((1, 3, 8, 8), generator=g), size=(side, side), mode="bilinear",
                          align_corners=False) for _ in range(n)]


def timed(device: str, fn):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run(args) -> dict:
    import torch

    pipe, rank = build_pipeline(args.preset, args.device, args.dtype, max(args.conditions), args.rank, args.seed)
    side = args.resolution if args.preset == "sd15" else pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = condition_images(max(args.conditions), side, args.seed)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, seed=args.seed, progress=False,
                  height=side, width=side)
    multi = {}
    for n in args.conditions:
        conds = {f"c{i}": (images[i], 1.0) for i in range(n)}

        def call(batched: bool, steps: int = args.steps):
            return pipe("upper jaw molar", conds, batch_conditions=batched, output_type="latent",
                        **{**common, "num_inference_steps": steps}).images

        latents = {m: call(m == "batched") for m in ("batched", "sequential")}  # warm-up, and the outputs
        times = alternating(["batched", "sequential"], args.repeats,
                            lambda m: timed(args.device, lambda: call(m == "batched"))[0])
        row = {f"{m}_s": statistics.median(ts) for m, ts in times.items()}
        row["repeats"] = args.repeats
        row["sequential_over_batched"] = ratio(row["sequential_s"], row["batched_s"])
        b, q = latents["batched"].float(), latents["sequential"].float()
        row["max_abs_latent_diff"] = float((b - q).abs().max())
        row["latent_abs_max"] = float(q.abs().max())
        # after one step: the two orders of summing the residuals differ only by rounding there; over
        # many CFG steps of a random-weight model (chaotic) that rounding can grow to O(1)
        b1, q1 = call(True, 1).float(), call(False, 1).float()
        row["one_step_max_abs_diff"] = float((b1 - q1).abs().max())
        row["one_step_rel_diff"] = float((b1 - q1).abs().max() / q1.abs().max().clamp_min(1e-12))
        multi[str(n)] = row
    one = {"c0": (images[0], 1.0)}
    gen = lambda: pipe("upper jaw molar", one, num_images_per_prompt=args.images, output_type="pt",  # noqa: E731
                       **{**common, "num_inference_steps": args.sampling_steps}).images
    gen()
    seconds, out = timed(args.device, gen)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    return {
        "benchmark": "sampling_speed", "preset": args.preset, "device": args.device, "dtype": args.dtype,
        "resolution": side, "rank": rank, "steps_multi_condition": args.steps, "guidance_scale": 7.5,
        "multi_condition": multi,
        "images_per_s": {"images": args.images, "steps": args.sampling_steps, "conditions": 1, "seconds": seconds,
                         "images_per_s": round(args.images / seconds, 4), "shape": list(out.shape)},
        "peak_mem_mb": peak, "environment": environment(args.device),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--resolution", type=int, default=512, help="sd15 image side (tiny: its own 64 px)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (sd15 128, tiny 8)")
    p.add_argument("--conditions", default="1,2,3", help="the N of the batched vs sequential comparison")
    p.add_argument("--steps", type=int, default=20, help="steps of each multi-condition call")
    p.add_argument("--sampling-steps", type=int, default=20, help="steps of the images/s call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode (alternating; the median)")
    p.add_argument("--images", type=int, default=4, help="images of the images/s call")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.conditions = [int(x) for x in args.conditions.split(",")]
    if min(args.conditions) < 1 or min(args.steps, args.sampling_steps, args.images, args.repeats) < 1:
        p.error("--conditions, --steps, --sampling-steps, --images and --repeats must be >= 1")
    if args.device == "cpu" and args.dtype == "fp16":
        p.error("--dtype fp16 needs --device cuda")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_device(args.device)
    check_device(args.device)
    set_threads(args.device, args.threads)
    result = run(args)
    print(save_json(result, args.out))
    return result


if __name__ == "__main__":
    main()
