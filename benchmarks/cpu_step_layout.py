"""The default's training steps on this CPU: precision and process layout, side by side.

The ``backbone`` stage is the default run's longest (about 40 % of ``make repro``) and, like
``train_base``, is bound by the step's arithmetic (a profile of a fresh-clone run: backward ~50 %,
convolutions and linears most of the rest; Adam ~3 %). This benchmark measures the levers on those
steps, in one run, with the default's tiny backbone config (``params.yaml`` ``backbone.tiny``,
random weights) and the stages' batch sizes:

``unet``  the text-conditioned UNet's step (forward, MSE, backward, AdamW) on latents of the
          default's size; ``vae``  the VAE's step (encode, sample, decode, L1 + KL, backward, AdamW)
          on images of the default's size; ``controlnet``  ``train_base``'s step: the Base
          ControlNet with the base conditions' LoRAs (one active) over the frozen UNet, the shared
          base + the active LoRA trained, at ``train_base``'s batch.

Per model and precision (fp32, bf16 autocast), three layouts: ``1x2`` one process with 2 torch
threads (the stage's layout); ``2x1`` 2 processes of 1 thread each, each running half the batch
on its own, with no gradient exchange (an upper bound on what splitting the cores can give); and
``2x1-ddp`` the same 2 processes joined by torch.distributed (gloo) under DistributedDataParallel,
as a 2-process ``accelerate launch`` of the stage trains: the gradients all-reduced every step
(the ControlNet with ``find_unused_parameters``, as ``train_base`` needs for its inactive LoRAs).
The figure is samples per second; ``ratio`` is against the stage's layout of the same model
(unet and controlnet: fp32, vae: bf16, as the stages train them). Layouts run in alternating
(ABBA) rounds; each round's figure is the median step of its timed steps.

    .venv/bin/python benchmarks/cpu_step_layout.py              # -> results/cpu_step_layout.json
    .venv/bin/python benchmarks/cpu_step_layout.py --steps 3 --warmup 1 --rounds 1 --models unet
    .venv/bin/python benchmarks/cpu_step_layout.py --precisions fp32 --models unet controlnet
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
MODELS = ("unet", "vae", "controlnet")
# what the stages train each model in (backbone: UNet fp32, VAE bf16; train_base: fp32)
STAGE_PRECISION = {"unet": "fp32", "vae": "bf16", "controlnet": "fp32"}
LAYOUTS = ("1x2", "2x1", "2x1-ddp")  # processes x threads (ddp: joined, gradients all-reduced)


def _batch(params: dict, model: str) -> int:
    if model == "controlnet":
        return int(params["train_base"]["train"]["batch_size"])
    return int(params["backbone"][model]["train"]["batch_size"])


def _vae_round(vae):
    """The VAE's round trip (encode, sample, decode) as one ``forward``, so DDP sees all of it."""
    import torch

    class Round(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, x, gen):
            post = self.vae.encode(x).latent_dist
            return self.vae.decode(post.sample(generator=gen)).sample, post.kl()

    return Round()


class _Step:
    """One model's training step on fixed random inputs of the default's sizes."""

    def __init__(self, model: str, batch: int):
        import torch

        from ctrlora.data.captions import CAPTION_VOCABULARY
        from ctrlora.models.backbone import TinyBackboneConfig, build_tiny_backbone

        torch.manual_seed(0)
        params = params_yaml()
        cfg = TinyBackboneConfig.from_params(params["backbone"]["tiny"])
        bb = build_tiny_backbone(cfg, CAPTION_VOCABULARY)
        size = int(cfg.image_size)
        latent = size // bb.vae_scale_factor
        # each rank of a group draws its own inputs (its half of a data-parallel batch)
        g = self.gen = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
        self.model, self.unused = model, False
        if model == "controlnet":
            from ctrlora.models.adapters import add_adapter, set_adapter, set_trainable
            from ctrlora.models.controlnet import CtrLoRAControlNet
            from ctrlora.training.controlnet import ControlledDenoiser

            conditions = list(params["train_base"]["conditions"])
            cn = CtrLoRAControlNet.from_unet(bb.unet, condition_embedding="vae")
            trainable = {}
            for c in conditions:
                add_adapter(cn, c, rank=int(params["train_base"]["rank"]), own_modules=False)
            for c in conditions:
                trainable.update({id(p): p for p in set_trainable(cn, "base", c)})
            for p in trainable.values():
                p.requires_grad_(True)
            set_adapter(cn, conditions[0])
            bb.unet.requires_grad_(False)
            self.net, self.unused = ControlledDenoiser(cn, bb.unet), len(conditions) > 1
            self.params = list(trainable.values())
        else:
            self.net = bb.unet if model == "unet" else _vae_round(bb.vae)
            self.params = list(self.net.parameters())
        self.net.train()
        if model in ("unet", "controlnet"):
            self.x = torch.randn(batch, bb.unet.config.in_channels, latent, latent, generator=g)
            self.t = torch.randint(0, 1000, (batch,), generator=g)
            self.ctx = torch.randn(batch, int(cfg.max_length), int(cfg.cross_attention_dim), generator=g)
            self.c = torch.randn(batch, bb.unet.config.in_channels, latent, latent, generator=g)
        else:
            self.x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1

    def loss(self, net):
        if self.model == "unet":
            return (net(self.x, self.t, encoder_hidden_states=self.ctx).sample.float() - self.x).pow(2).mean()
        if self.model == "controlnet":
            return (net(self.x, self.t, self.ctx, self.c).float() - self.x).pow(2).mean()
        rec, kl = net(self.x, self.gen)
        return (rec.float() - self.x).abs().mean() + 1e-6 * kl.mean()


def child(model: str, precision: str, batch: int, steps: int, warmup: int, ddp: bool = False) -> dict:
    """One process: ``steps`` training steps of ``model``; the median of the steps after ``warmup``.
    ``ddp``: this process is one rank of a gloo group (``RANK`` / ``WORLD_SIZE`` / ``MASTER_*``
    in the environment) and the model is wrapped in DistributedDataParallel."""
    import contextlib

    import torch

    s = _Step(model, batch)
    net = s.net
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        net = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=s.unused)
    opt = torch.optim.AdamW(s.params, lr=1e-4)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step() -> None:
        with autocast():
            loss = s.loss(net)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if ddp:
        torch.distributed.destroy_process_group()
    out = {"median_step_s": statistics.median(times), "batch": batch, "threads": torch.get_num_threads()}
    if os.environ.get("CTRLORA_BENCH_DIGEST"):  # the tests: do the ranks hold the same weights?
        import hashlib

        out["digest"] = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in s.params)).hexdigest()
    return out


def _spawn(model: str, precision: str, batch: int, threads: int, args, rank: int | None = None,
           port: int | None = None, ddp: bool = True) -> subprocess.Popen:
    """A child process; with ``rank``, one rank of a 2-process gloo group on ``port`` (``ddp=False``:
    the rank's own inputs, but no group)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model, precision, str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(threads)]
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        if ddp:
            cmd.append("--ddp")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    if layout == "2x1-ddp":
        port = _free_port()
        rows = _collect([_spawn(model, precision, half, 1, args, rank=k, port=port) for k in range(2)])
        # one optimiser step of the whole batch takes as long as the slower rank's step
        step = max(r["median_step_s"] for r in rows)
        return {"samples_per_s": batch / step, "median_step_s": [r["median_step_s"] for r in rows]}
    rows = _collect([_spawn(model, precision, half, 1, args) for _ in range(2)])
    return {"samples_per_s": sum(half / r["median_step_s"] for r in rows),
            "median_step_s": [r["median_step_s"] for r in rows]}


def run(args: argparse.Namespace) -> dict:
    params = params_yaml()
    results = {}
    for model in args.models:
        batch = _batch(params, model)
        names = [f"{p}/{lay}" for p in args.precisions for lay in LAYOUTS]
        runs = alternating(names, args.rounds, lambda n: layout_run(model, *n.split("/"), batch, args))
        rows = {n: {"samples_per_s": round(statistics.median(r["samples_per_s"] for r in rs), 2),
                    "per_round": [round(r["samples_per_s"], 2) for r in rs],
                    "median_step_s": [[round(s, 4) for s in r["median_step_s"]] for r in rs]}
                for n, rs in runs.items()}
        stage = f"{STAGE_PRECISION[model]}/1x2"
        ref = rows[stage]["samples_per_s"] if stage in rows else None
        for row in rows.values():
            row["ratio_to_stage_layout"] = ratio(row["samples_per_s"], ref) if ref else None
        results[model] = {"batch": batch, "stage_layout": stage, "layouts": rows}
        for n, row in rows.items():
            print(f"{model:>10} {n:>13}: {row['samples_per_s']:8.1f} samples/s  x{row['ratio_to_stage_layout']}",
                  flush=True)
    return {"benchmark": "cpu_step_layout",
            "setup": {"models": args.models, "precisions": args.precisions, "steps": args.steps,
                      "warmup": args.warmup, "rounds": args.rounds,
                      "layouts": {"1x2": "1 process, 2 torch threads, the whole batch",
                                  "2x1": "2 processes, 1 torch thread each, half the batch each, concurrently, "
                                         "no gradient all-reduce",
                                  "2x1-ddp": "2 processes, 1 torch thread each, half the batch each, joined by "
                                             "torch.distributed (gloo) under DistributedDataParallel: the "
                                             "gradients all-reduced every step"},
                      "config": "params.yaml backbone.tiny, random weights; batch = backbone.<model>.train."
                                "batch_size (unet, vae), train_base.train.batch_size (controlnet)"},
            "results": results, "environment": environment("cpu")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=12, help="timed steps per round and process")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds per layout")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # set by the parent for children
    p.add_argument("--child", nargs=3, metavar=("MODEL", "PRECISION", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)  # a child that is one rank of a group
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
        print(json.dumps(child(model, precision, int(batch), args.steps, args.warmup, ddp=args.ddp)))
        return None
    return run_and_save(run, args)


if __name__ == "__main__":
    main()
