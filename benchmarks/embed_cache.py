"""Adapter-training step time with the embed cache against encoding on the fly, in one run.

Both variants train the same adapter of the same ControlNet on the same pairs, with the same
step-addressed randomness (so step ``s`` draws the same pairs, noise, timesteps and prompt
dropout in both), through the project's own trainer:

``cached``      ``ctrlora.training.controlnet.train_condition(mode="adapter")`` unchanged: latents
                are fresh samples of the cached VAE posteriors, text states come from the cache.
``on_the_fly``  the same trainer (``Trainer.fit`` on the same ``ControlledDenoiser``), but the step
                VAE-encodes the photographs and condition images and runs the tokenizer + text
                encoder on the (dropout-applied) captions every time, as a trainer without a
                cache would.

Step times come from the trainer's ``on_log`` callback (``log_every=1``); the first ``--warmup``
steps of every block are dropped. The variants run in blocks ordered ABBA... (``--rounds``) so a
change of machine load hits both alike; the figure is the median over all timed steps.

Data: ``--prepared`` + ``--backbone`` (real prepared pairs and a diffusers-layout backbone), or
``--synthetic`` (a randomly initialised tiny backbone and smooth random images, in-process).

    python benchmarks/embed_cache.py --synthetic
    python benchmarks/embed_cache.py --prepared data/prepared --backbone foundation/backbone --condition lighting
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (StepClock, check_device, environment, mixed_precision, ratio, set_threads,  # noqa: E402
                     save_json, summary, use_device)

SYNTHETIC_WORDS = ("upper lower jaw molar premolar incisor canine teeth present shade a1 a2 a3 b1 b2 c1 "
                   "light from left right top front view intraoral photo").split()


@dataclass
class Setup:
    """Everything both variants share: one backbone, one ControlNet with the condition's adapter,
    the same pairs (as image tensors for ``on_the_fly``, as an embed cache for ``cached``)."""
    backbone: object
    controlnet: object
    condition: str
    photos: object  # float32 [N, 3, H, W] in [-1, 1]
    condition_images: object  # float32 [N, 3, H, W] in [0, 1]
    captions: list[str]
    cache: object  # ctrlora.training.embed.EmbedCache over exactly these N pairs
    device: str
    cache_build_s: float = 0.0
    source: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- inputs
def _synthetic_images(n: int, size: int, seed: int):
    """Smooth random images (bilinear up-sampling of coarse noise): photo-like in [-1, 1],
    condition-like in [0, 1]."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((2 * n, 3, max(size // 8, 2), max(size // 8, 2)), generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return smooth[:n] * 2 - 1, smooth[n:]


def _synthetic_captions(n: int, seed: int) -> list[str]:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    words = list(SYNTHETIC_WORDS)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 10, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        out.append(" ".join(words[i] for i in idx))
    return out


def build_cache(backbone, photos, condition_images, captions, condition: str, batch: int = 64):
    """An :class:`EmbedCache` of these pairs, computed as the ``embed`` stage computes it (VAE
    posterior mean / log-variance of photos and condition images, text-encoder states)."""
    import torch

    from ctrlora.models.latents import encode_posterior, encode_text
    from ctrlora.training.embed import ConditionEmbeds, EmbedCache

    vae, n = backbone.vae, len(captions)
    photo_mean, photo_logvar = encode_posterior(vae, photos, batch)
    cond_mean, cond_logvar = encode_posterior(vae, condition_images, batch)
    text = encode_text(backbone.text_encoder, backbone.tokenizer, captions, batch)
    empty = encode_text(backbone.text_encoder, backbone.tokenizer, [""])
    ids = [f"pair{i:05d}" for i in range(n)]
    cond = ConditionEmbeds(torch.arange(n, dtype=torch.long), cond_mean, cond_logvar)
    return EmbedCache(ids, ["train"] * n, list(captions), float(vae.config.scaling_factor),
                      photo_mean, photo_logvar, text, empty, {condition: cond})


def _controlnet(backbone, condition: str, rank: int, base_dir: str | None, seed: int):
    import torch

    from ctrlora.models.adapters import add_adapter
    from ctrlora.models.controlnet import CtrLoRAControlNet

    if base_dir:
        cn = CtrLoRAControlNet.from_pretrained(base_dir)
    else:
        cn = CtrLoRAControlNet.from_unet(backbone.unet, condition_embedding="vae",
                                         vae_scale_factor=backbone.vae_scale_factor)
    cn.requires_grad_(False)
    torch.manual_seed(seed)
    add_adapter(cn, condition, rank=rank, own_modules=True)
    return cn


def build_setup(synthetic: bool = True, prepared: str | None = None, backbone_dir: str | None = None,
                condition: str = "lighting", pairs: int = 64, rank: int = 16, base_dir: str | None = None,
                device: str = "cpu", seed: int = 0) -> Setup:
    import torch

    from ctrlora.models.backbone import build_tiny_backbone, load_backbone, tiny_backbone_config

    if synthetic:
        cfg = tiny_backbone_config(seed=seed)
        bb = build_tiny_backbone(cfg, SYNTHETIC_WORDS)
        photos, conds = _synthetic_images(pairs, cfg.image_size, seed)
        captions = _synthetic_captions(pairs, seed)
        source = {"data": "synthetic", "backbone": "tiny preset, random weights", "image_size": cfg.image_size}
    else:
        if not prepared or not backbone_dir:
            raise SystemExit("real data needs --prepared and --backbone (or pass --synthetic)")
        from ctrlora.data.pairs import PairDataset

        bb = load_backbone(backbone_dir)
        ds = PairDataset(prepared, condition, "train")
        if len(ds) == 0:
            raise SystemExit(f"{prepared}: no training pairs for condition {condition!r}")
        items = [ds[i] for i in range(min(pairs, len(ds)))]
        photos = torch.stack([it["photo"] for it in items])
        conds = torch.stack([it["condition"] for it in items])
        captions = [it["caption"] for it in items]
        source = {"data": str(prepared), "backbone": str(backbone_dir), "image_size": int(photos.shape[-1]),
                  "base": str(base_dir) if base_dir else "from_unet (backbone UNet weights)"}
    for m in (bb.vae, bb.text_encoder, bb.unet):
        m.to(device).eval().requires_grad_(False)
    t0 = time.perf_counter()
    cache = build_cache(bb, photos, conds, captions, condition)
    build_s = time.perf_counter() - t0
    cn = _controlnet(bb, condition, rank, base_dir, seed)
    return Setup(bb, cn, condition, photos, conds, captions, cache, device, build_s, source)


# ---------------------------------------------------------------------- the two steps
def _train_config(batch: int, steps: int, mp: str, seed: int):
    from ctrlora.training.controlnet import ControlNetTrainConfig
    from ctrlora.training.loop import TrainConfig

    # the train_adapter stage's settings apart from the step count / batch; log every step for the clock
    return ControlNetTrainConfig(TrainConfig(max_steps=steps, batch_size=batch, learning_rate=1e-3,
                                             mixed_precision=mp, log_every=1, seed=seed), prompt_dropout=0.3)


def on_the_fly_loss(model, s: Setup, cfg, gen, device):
    """The loss of ``controlnet_loss`` with every input encoded inside the step (same random draws in
    the same order: pairs, photo noise, condition noise, prompt dropout, noise, timesteps)."""
    import torch

    from ctrlora.models.latents import encode_posterior, encode_text, sample_latent
    from ctrlora.training.diffusion import denoising_loss

    bb = s.backbone
    b = cfg.train.batch_size
    pick = torch.randint(0, len(s.captions), (b,), generator=gen)
    sf = float(bb.vae.config.scaling_factor)
    with torch.no_grad():
        z = sample_latent(*encode_posterior(bb.vae, s.photos[pick], None, out_device=None), sf, gen)
        c = sample_latent(*encode_posterior(bb.vae, s.condition_images[pick], None, out_device=None), sf, gen)
        drop = torch.rand(b, generator=gen) < cfg.prompt_dropout
        captions = ["" if d else s.captions[i] for i, d in zip(pick.tolist(), drop.tolist())]
        text = encode_text(bb.text_encoder, bb.tokenizer, captions, None, out_device=None)
    noise = torch.randn(z.shape, generator=gen).to(device)
    t = torch.randint(0, bb.scheduler.config.num_train_timesteps, (b,), generator=gen).to(device)
    noisy = bb.scheduler.add_noise(z, noise, t)
    pred = model(noisy, t, text, c)
    return denoising_loss(bb.scheduler, pred, z, noise, t)


def run_cached(s: Setup, batch: int, steps: int, mp: str = "no", seed: int = 0) -> StepClock:
    """``steps`` steps of the project's adapter trainer, reading the embed cache."""
    from ctrlora.training.controlnet import train_condition

    clock = StepClock(cuda=s.device == "cuda")
    train_condition(s.controlnet, s.backbone.unet, s.backbone.scheduler, s.cache, s.condition,
                    _train_config(batch, steps, mp, seed), mode="adapter", on_log=clock)
    return clock


def run_on_the_fly(s: Setup, batch: int, steps: int, mp: str = "no", seed: int = 0) -> StepClock:
    """``steps`` steps of the same trainer and trainable set, encoding inside every step."""
    from ctrlora.models.adapters import set_trainable
    from ctrlora.training.controlnet import ControlledDenoiser, make_trainer

    cfg = _train_config(batch, steps, mp, seed)
    params = set_trainable(s.controlnet, "adapter", s.condition)
    s.backbone.unet.requires_grad_(False)
    trainer = make_trainer(cfg, ControlledDenoiser(s.controlnet, s.backbone.unet), params, None, unused=False)
    device = trainer.accelerator.device
    clock = StepClock(cuda=s.device == "cuda")
    trainer.fit(lambda m, step, gen: (on_the_fly_loss(m, s, cfg, gen, device), {}),
                desc=f"on_the_fly[{s.condition}]", on_log=clock)
    return clock


class CallCounter:
    """Counts forward calls of modules (a forward hook each)."""

    def __init__(self, **modules):
        self.counts = {k: 0 for k in modules}
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(_module, _inputs, _output):
            self.counts[key] += 1
        return hook

    def take(self) -> dict:
        out = dict(self.counts)
        for k in self.counts:
            self.counts[k] = 0
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------- benchmark
def benchmark(s: Setup, batch: int = 32, steps: int = 10, warmup: int = 2, rounds: int = 1,
              mp: str = "no", seed: int = 0) -> dict:
    """Run the variants in ABBA... blocks of ``warmup + steps`` steps; return the JSON dict."""
    from ctrlora.models.adapters import list_adapters

    if steps < 1 or warmup < 1 or rounds < 1:
        raise ValueError("steps, warmup and rounds must be >= 1")
    runners = {"cached": run_cached, "on_the_fly": run_on_the_fly}
    order = []
    for r in range(rounds):
        order += ["cached", "on_the_fly"] if r % 2 == 0 else ["on_the_fly", "cached"]
    times: dict[str, list[float]] = {k: [] for k in runners}
    losses: dict[str, list[float]] = {k: [] for k in runners}
    calls: dict[str, dict] = {}
    counter = CallCounter(vae_encoder=s.backbone.vae.encoder, text_encoder=s.backbone.text_encoder)
    try:
        for name in order:
            counter.take()
            clock = runners[name](s, batch, warmup + steps, mp, seed)
            per_step = {k: v / (warmup + steps) for k, v in counter.take().items()}
            calls[name] = per_step
            times[name] += clock.step_times(warmup)
            losses[name] = clock.losses
    finally:
        counter.close()
    cached, fly = summary(times["cached"]), summary(times["on_the_fly"])
    return {
        "benchmark": "embed_cache",
        "condition": s.condition,
        "source": s.source,
        "device": s.device,
        "mixed_precision": mp,
        "batch": batch,
        "pairs": len(s.captions),
        "adapter_rank": list_adapters(s.controlnet)[s.condition]["rank"],
        "warmup_steps_per_block": warmup,
        "timed_steps_per_block": steps,
        "order": order,
        "step_s": {"cached": cached["median_s"], "on_the_fly": fly["median_s"]},
        "stats": {"cached": cached, "on_the_fly": fly},
        "ratio_on_the_fly_over_cached": ratio(fly["median_s"], cached["median_s"]),
        "encoder_calls_per_step": calls,
        "first_losses": {k: [round(x, 6) for x in v[:3]] for k, v in losses.items()},
        "cache_build_s": round(s.cache_build_s, 4),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_argument_group("data")
    src.add_argument("--synthetic", action="store_true", help="tiny random backbone + synthetic images (in-process)")
    src.add_argument("--prepared", default=None, help="prepared data root (e.g. data/prepared)")
    src.add_argument("--backbone", default=None, help="diffusers-layout backbone dir (e.g. foundation/backbone)")
    src.add_argument("--base", default=None, help="optional trained base ControlNet dir (e.g. models/base)")
    src.add_argument("--condition", default="lighting")
    src.add_argument("--pairs", type=int, default=64, help="pairs drawn from (default 64)")
    p.add_argument("--rank", type=int, default=16, help="adapter LoRA rank (default 16, the train_adapter stage's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every block (>= 1)")
    p.add_argument("--rounds", type=int, default=2, help="blocks per variant, ordered ABBA...")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if not args.synthetic and not (args.prepared and args.backbone):
        p.error("pass --synthetic, or both --prepared and --backbone")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    use_device(args.device)
    check_device(args.device)
    mp = mixed_precision(args.device, args.dtype)
    threads = set_threads(args.device, args.threads)
    s = build_setup(args.synthetic, args.prepared, args.backbone, args.condition, args.pairs, args.rank,
                    args.base, args.device, args.seed)
    result = benchmark(s, args.batch, args.steps, args.warmup, args.rounds, mp, args.seed)
    result["threads"] = threads
    result["environment"] = environment(args.device)
    print(save_json(result, args.out))
    return result


if __name__ == "__main__":
    main()
