"""The tiny backbone's training step on this CPU: precision and process layout, side by side.

The ``backbone`` stage is the default run's longest (about 40 % of ``make repro``) and is bound by
the step's arithmetic (a profile of a fresh-clone run: backward ~50 %, convolutions and linears
most of the rest; Adam ~3 %). This benchmark measures the levers on that step, in one run, with
the default's tiny backbone config (``params.yaml`` ``backbone.tiny``, random weights) and its
batch sizes:

``unet``  the text-conditioned UNet's step (forward, MSE, backward, AdamW) on latents of the
          default's size; ``vae``  the VAE's step (encode, sample, decode, L1 + KL, backward, AdamW)
          on images of the default's size.

Per model, three layouts: fp32 and bf16 autocast in one process with 2 torch threads (the stage's
layout), and the same precision in 2 processes of 1 thread each, each running half the batch (the
layout of a 2-process data-parallel run, without its gradient all-reduce: an upper bound on what
splitting the cores that way can give). The figure is samples per second; ``ratio`` is against
the stage's layout of the same model (unet: fp32, vae: bf16, as the stage trains them). Layouts
run in alternating (ABBA) rounds; each round's figure is the median step of its timed steps.

    .venv/bin/python benchmarks/cpu_step_layout.py              # -> results/cpu_step_layout.json
    .venv/bin/python benchmarks/cpu_step_layout.py --steps 3 --warmup 1 --rounds 1 --models unet
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, alternating, environment, params_yaml, ratio, run_and_save  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cpu_step_layout.json"
STAGE_PRECISION = {"unet": "fp32", "vae": "bf16"}  # what the backbone stage trains each model in
LAYOUTS = ("1x2", "2x1")  # processes x threads


def _batch(params: dict, model: str) -> int:
    return int(params["backbone"][model]["train"]["batch_size"])


def child(model: str, precision: str, batch: int, steps: int, warmup: int) -> dict:
    """One process: ``steps`` training steps of ``model``; the median of the steps after ``warmup``."""
    import contextlib

    import torch

    from ctrlora.data.captions import CAPTION_VOCABULARY
    from ctrlora.models.backbone import TinyBackboneConfig, build_tiny_backbone

    torch.manual_seed(0)
    cfg = TinyBackboneConfig.from_params(params_yaml()["backbone"]["tiny"])
    bb = build_tiny_backbone(cfg, CAPTION_VOCABULARY)
    size = int(cfg.image_size)
    latent = size // bb.vae_scale_factor
    net = bb.unet if model == "unet" else bb.vae
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    if model == "unet":
        x = torch.randn(batch, net.config.in_channels, latent, latent, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        ctx = torch.randn(batch, int(cfg.max_length), int(cfg.cross_attention_dim), generator=g)
    else:
        x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> None:
        with autocast():
            if model == "unet":
                loss = (net(x, t, encoder_hidden_states=ctx).sample.float() - x).pow(2).mean()
            else:
                post = net.encode(x).latent_dist
                rec = net.decode(post.sample(generator=g)).sample.float()
                loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"median_step_s": statistics.median(times), "batch": batch, "threads": torch.get_num_threads()}


def _spawn(model: str, precision: str, batch: int, threads: int, args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model, precision, str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"benchmark child failed (exit {p.returncode}):\n{stderr[-3000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def layout_run(model: str, precision: str, layout: str, batch: int, args) -> dict:
    """One round of one (model, precision, layout): samples/s over its process(es)."""
    if layout == "1x2":
        (r,) = _collect([_spawn(model, precision, batch, 2, args)])
        return {"samples_per_s": batch / r["median_step_s"], "median_step_s": [r["median_step_s"]]}
    half = batch // 2
    rows = _collect([_spawn(model, precision, half, 1, args) for _ in range(2)])
    return {"samples_per_s": sum(half / r["median_step_s"] for r in rows),
            "median_step_s": [r["median_step_s"] for r in rows]}


def run(args: argparse.Namespace) -> dict:
    params = params_yaml()
    results = {}
    for model in args.models:
        batch = _batch(params, model)
        names = [f"{p}/{lay}" for p in ("fp32", "bf16") for lay in LAYOUTS]
        runs = alternating(names, args.rounds, lambda n: layout_run(model, *n.split("/"), batch, args))
        rows = {n: {"samples_per_s": round(statistics.median(r["samples_per_s"] for r in rs), 2),
                    "per_round": [round(r["samples_per_s"], 2) for r in rs],
                    "median_step_s": [[round(s, 4) for s in r["median_step_s"]] for r in rs]}
                for n, rs in runs.items()}
        ref = rows[f"{STAGE_PRECISION[model]}/1x2"]["samples_per_s"]
        for row in rows.values():
            row["ratio_to_stage_layout"] = ratio(row["samples_per_s"], ref)
        results[model] = {"batch": batch, "stage_layout": f"{STAGE_PRECISION[model]}/1x2", "layouts": rows}
        for n, row in rows.items():
            print(f"{model:>5} {n:>9}: {row['samples_per_s']:8.1f} samples/s  x{row['ratio_to_stage_layout']}",
                  flush=True)
    return {"benchmark": "cpu_step_layout",
            "setup": {"models": args.models, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                      "layouts": {"1x2": "1 process, 2 torch threads, the whole batch",
                                  "2x1": "2 processes, 1 torch thread each, half the batch each, concurrently, "
                                         "no gradient all-reduce"},
                      "config": "params.yaml backbone.tiny, random weights; batch = backbone.<model>.train.batch_size"},
            "results": results, "environment": environment("cpu")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
    p.add_argument("--steps", type=int, default=12, help="timed steps per round and process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds per layout")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # set by the parent for children
    p.add_argument("--child", nargs=3, metavar=("MODEL", "PRECISION", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(int(args.threads or 1))
        model, precision, batch = args.child
        print(json.dumps(child(model, precision, int(batch), args.steps, args.warmup)))
        return None
    return run_and_save(run, args)


if __name__ == "__main__":
    main()
