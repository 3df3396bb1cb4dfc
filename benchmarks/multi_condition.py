"""Multi-condition sampling: N conditions x the CFG pair in one ControlNet forward (per-sample
adapters, ``batch_conditions=True``, the pipeline's default) against N forwards per step with each
adapter switched in (``batch_conditions=False``, the reference's loop), at N = 1, 2, 3.

Both paths run the same pipeline call (same seed, prompts, condition images, steps, CFG); the
final latents must agree to float round-off (``max_abs_diff`` in the JSON, checked against
``--tolerance`` relative to the latents' largest value). Timing: the two paths alternate
(batched, sequential, sequential, batched, ... for ``--rounds``) so a change of machine load hits
both alike; per N the median over rounds and the ratio sequential / batched (> 1: batching wins).

    # the trained default (models/ from `dvc repro`): backbone, base and its adapters
    .venv/bin/python benchmarks/multi_condition.py --backbone foundation/backbone --base models/base
    # anywhere: a random backbone at params.yaml backbone.tiny sizes with random adapters
    .venv/bin/python benchmarks/multi_condition.py --random
Options: ``--counts 1 2 3 --batch 4 --steps 10 --guidance 7.5 --rounds 3 --device cpu|cuda
--dtype fp32|bf16|fp16 --threads N --out FILE.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, check_device, environment, save_json, set_threads  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu_multi_condition_tiny.json"
CONDITIONS = ("segmentation", "depth", "canny", "palette", "lighting", "normal")


def _random_setup(seed: int):
    """A random backbone at params.yaml's tiny sizes and a ControlNet with three random adapters."""
    import torch

    from ctrlora.models import adapters
    from ctrlora.models.backbone import build_tiny_backbone, tiny_backbone_config
    from ctrlora.models.controlnet import CtrLoRAControlNet

    cfg = tiny_backbone_config(ROOT / "params.yaml")
    torch.manual_seed(seed)
    bb = build_tiny_backbone(cfg, ["upper", "lower", "molar", "incisor", "photo", "teeth", "dental"])
    cn = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(cn.controlnet_down_blocks.parameters()) + list(cn.controlnet_mid_block.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for name in CONDITIONS[:3]:
        adapters.add_adapter(cn, name, rank=8)
        with torch.no_grad():
            for k, t in adapters.adapter_tensor_refs(cn, name).items():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    adapters.set_adapter(cn, None)
    return bb, cn.eval()


def _trained_setup(backbone: str, base: str):
    """The trained backbone and base with every adapter found under ``<base>/adapters`` and
    ``<base>/../adapters``."""
    from ctrlora.evaluation.loading import load_models

    base_dir = Path(base)
    dirs = {}
    for parent in (base_dir / "adapters", base_dir.parent / "adapters"):
        if parent.is_dir():
            dirs.update({d.name: d for d in sorted(parent.iterdir()) if (d / "adapter_config.json").is_file()})
    record = Path(backbone) / "backbone.json"
    if record.is_file():
        backbone = json.loads(record.read_text())["path"]
    models = load_models(backbone, base_dir, dirs)
    return models.backbone, models.controlnet.eval()


def run(args: argparse.Namespace) -> dict:
    import torch

    from ctrlora.models.adapters import list_adapters
    from ctrlora.sampling import CtrLoRAPipeline

    check_device(args.device)
    threads = set_threads(args.device, args.threads)
    bb, cn = _random_setup(args.seed) if args.random else _trained_setup(args.backbone, args.base)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pipe = CtrLoRAPipeline.from_components(bb, cn).to(args.device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    names = sorted(list_adapters(cn))
    if len(names) < max(args.counts):
        raise SystemExit(f"{max(args.counts)} conditions asked for, the ControlNet holds adapters {names}")
    size = bb.unet.config.sample_size * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(args.seed)
    images = {n: torch.rand(args.batch, 3, size, size, generator=g) for n in names}
    prompts = ["upper molar, dental photo"] * args.batch

    def call(n: int, batched: bool):
        conds = {name: (images[name], 1.0 / n) for name in names[:n]}
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = pipe(prompts, conds, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                   output_type="latent", progress=False, batch_conditions=batched).images
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    rows = []
    for n in args.counts:
        call(n, True)  # warm-up (allocator, kernels)
        times = {"batched": [], "sequential": []}
        outs = {}
        for r in range(args.rounds):
            order = ("batched", "sequential") if r % 2 == 0 else ("sequential", "batched")
            for variant in order:
                outs[variant], dt = call(n, variant == "batched")
                times[variant].append(dt)
        diff = float((outs["batched"].float() - outs["sequential"].float()).abs().max())
        scale = float(outs["sequential"].float().abs().max())
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"conditions": n, "adapters": names[:n], "median_s": med, "times_s": times,
               "ratio_sequential_over_batched": med["sequential"] / med["batched"],
               "max_abs_diff": diff, "latent_scale": scale, "equal": diff <= args.tolerance * max(1.0, scale)}
        rows.append(row)
        print(f"N={n}: batched {med['batched']:.3f} s, sequential {med['sequential']:.3f} s, "
              f"ratio {row['ratio_sequential_over_batched']:.2f}x, max |diff| {diff:.2g}", flush=True)
    return {
        "benchmark": "multi_condition",
        "setup": {"models": "random tiny (params.yaml backbone.tiny)" if args.random else
                  {"backbone": str(args.backbone), "base": str(args.base)},
                  "batch": args.batch, "image_size": size, "steps": args.steps, "guidance": args.guidance,
                  "scheduler": "ddim", "rounds": args.rounds, "device": args.device, "dtype": args.dtype,
                  "threads": threads, "tolerance": args.tolerance},
        "results": rows,
        "all_equal": all(r["equal"] for r in rows),
        "environment": environment(args.device),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default=str(ROOT / "models" / "backbone"))
    p.add_argument("--base", default=str(ROOT / "models" / "base"))
    p.add_argument("--random", action="store_true", help="random tiny models instead of the trained ones")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--batch", type=int, default=4, help="images per call")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (> 1: the CFG pair is batched too)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |batched - sequential| / max(1, |latents|)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    save_json(report, args.out)
    print(f"-> {args.out}")
    if not report["all_equal"]:
        raise SystemExit("batched and sequential outputs differ beyond the tolerance")
    return report


if __name__ == "__main__":
    main()
