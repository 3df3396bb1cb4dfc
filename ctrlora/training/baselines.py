"""The research baselines of a new-condition adapter: what each method trains, one training run of
a method (one learning rate, one seed) saved to a directory, and the learning-rate choice.

Every method learns the same new condition with the **same recipe** as the production adapter
(``train_adapter``'s pairs, steps, batch, prompt dropout and rank, :class:`Recipe`); only the
starting ControlNet, what trains, and the learning rate differ:

==================== ============================================== ===========================
method               starting ControlNet                            trains
==================== ============================================== ===========================
``adapter``          the trained Base ControlNet                    the condition's adapter
``adapter_unet_copy`` copied from the UNet encoder, no base training the condition's adapter
``adapter_random``   randomly initialised (diffusers' default init) the condition's adapter
``full_finetune``    the trained Base ControlNet                    every ControlNet weight
``cnn``              copied from the UNet + a random hint CNN that  every weight
                     reads the condition *image*
``vae_scratch``      copied from the UNet, VAE condition embedding  every weight
==================== ============================================== ===========================

``adapter`` vs ``adapter_unet_copy`` asks whether base training matters (the informative
control: same weights a user could start from for free); ``adapter_random`` is the weak control.
``cnn`` vs ``vae_scratch`` is the condition-embedding ablation. Both pairs save snapshots during
training (the whole ControlNet, or the adapter), so fidelity can be plotted against steps: how
early each method learns, not only where it ends.

Seeds: run seed ``k`` trains with ``recipe.train.seed + k`` (batches, noise, timesteps, prompt
dropout, and the ``max_pairs`` subset the trainer draws) and initialises the random parts (LoRA
A, a random ControlNet, the hint CNN) after ``torch.manual_seed`` of the same number. Seed 0 of
``adapter`` is thus seeded as the production ``train_adapter`` stage is (same pairs and noise).

The snapshots are the weights as they are at that step; with ``ema_decay`` > 0 the run's final
ControlNet is the averaged one (the trainer copies it in at the end), the last snapshot is not.

A run directory holds ``run.json`` (method, condition, rate, seed, parameter counts), then
``controlnet/`` (``save_pretrained``: the fine-tuned ControlNet, or the untouched starting
ControlNet of an adapter run, omitted when that is the trained base), ``adapter/`` for adapter
methods and ``snapshots/step_<k>/`` (a ControlNet, or an adapter for adapter methods) for
snapshot methods.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ctrlora.training.loop import TrainConfig

__all__ = ["Method", "METHODS", "method", "Recipe", "RunSpec", "sweep_specs", "build_controlnet", "train_run",
           "read_run", "load_run", "run_snapshots", "snapshot_steps", "condition_images_for_cache",
           "select_learning_rates"]

RUN_INFO = "run.json"


@dataclass(frozen=True)
class Method:
    name: str
    init: str              # "base" (trained Base ControlNet) | "unet_copy" | "random"
    mode: str              # "adapter" (only the condition's adapter trains) | "full" (every weight)
    embedding: str = "vae"  # "vae" (condition latent) | "cnn" (hint CNN on the condition image)
    snapshots: bool = False  # save the trained weights every ``snapshot_every`` steps (ControlNet or adapter)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adapter", init="base", mode="adapter", snapshots=True),
    Method("adapter_unet_copy", init="unet_copy", mode="adapter", snapshots=True),
    Method("adapter_random", init="random", mode="adapter"),
    Method("full_finetune", init="base", mode="full"),
    Method("cnn", init="unet_copy", mode="full", embedding="cnn", snapshots=True),
    Method("vae_scratch", init="unet_copy", mode="full", embedding="vae", snapshots=True),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class Recipe:
    """The new-condition recipe every method shares (the ``train_adapter`` params)."""

    train: TrainConfig
    rank: int
    prompt_dropout: float
    max_pairs: int | None = None

    @classmethod
    def from_params(cls, section: Mapping[str, Any], where: str = "train_adapter",
                    also: Sequence[str] = ("conditions",)) -> "Recipe":
        """From params.yaml ``train_adapter`` (``max_pairs`` null or 0: every pair); ``also``: the
        section's other keys, which the caller reads. Unknown or missing keys are refused."""
        from ctrlora.params import checked_section

        p = checked_section(where, section, ("train", "rank", "prompt_dropout", "max_pairs", *also))
        return cls(TrainConfig.from_dict(dict(p["train"])), int(p["rank"]), float(p["prompt_dropout"]),
                   None if p["max_pairs"] in (None, 0) else int(p["max_pairs"]))


@dataclass(frozen=True)
class RunSpec:
    """One training run: ``method`` at ``learning_rate`` with seed index ``seed`` (0, 1, ...)."""

    method: str
    learning_rate: float
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.method}/lr_{self.learning_rate:g}/seed_{self.seed}"


def snapshot_steps(max_steps: int, every: int | None) -> list[int]:
    """``every``, ``2 * every``, ... up to and including ``max_steps``."""
    if not every:
        return [max_steps]
    if every < 1:
        raise ValueError(f"snapshot_every must be >= 1, got {every}")
    return sorted(set(range(every, max_steps + 1, every)) | {max_steps})


def condition_images_for_cache(prepared_root: str | Path, cache, condition: str) -> torch.Tensor:
    """The hint CNN's input: condition images in [0, 1], ``[M, 3, H, W]``, one per pair row of the
    embed cache's ``condition`` (row i = the image of scan ``scan_ids[photo_index[i]]``)."""
    import numpy as np

    from ctrlora.data.files import read_png

    folder = Path(prepared_root) / "conditions" / condition
    images = []
    for row in cache.conditions[condition].photo_index.tolist():
        path = folder / f"{cache.scan_ids[row]}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: condition image of cached pair {cache.scan_ids[row]!r} is missing; "
                                    "the embed cache and the prepared data disagree (rerun `embed`)")
        images.append(read_png(path, "RGB", convert=True))
    arr = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def build_controlnet(name: str, backbone, condition: str, rank: int, seed: int,
                     base_dir: str | Path | None = None):
    """The starting ControlNet of method ``name`` (after ``torch.manual_seed(seed)``), with a fresh
    adapter ``condition`` for adapter methods. Returns ``(controlnet, base_hash or None)``: the
    hash of the frozen base an adapter is trained on."""
    from ctrlora.models.adapters import add_adapter, base_hash
    from ctrlora.models.controlnet import CtrLoRAControlNet

    m = method(name)
    torch.manual_seed(seed)
    if m.init == "base":
        if base_dir is None:
            raise ValueError(f"method {name!r} starts from the trained base: pass base_dir")
        controlnet = CtrLoRAControlNet.from_pretrained(base_dir)
    else:
        controlnet = CtrLoRAControlNet.from_unet(backbone.unet, condition_embedding=m.embedding,
                                                 copy_weights=m.init == "unet_copy",
                                                 vae_scale_factor=backbone.vae_scale_factor)
    if m.mode != "adapter":
        return controlnet, None
    controlnet.requires_grad_(False)
    bh = base_hash(controlnet)
    add_adapter(controlnet, condition, rank=rank, own_modules=True)
    return controlnet, bh


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def train_run(spec: RunSpec, backbone, cache, condition: str, recipe: Recipe, out_dir: str | Path,
              base_dir: str | Path | None = None, condition_images: torch.Tensor | None = None,
              snapshot_every: int | None = None, checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train run ``spec`` with the shared ``recipe`` and write it to ``out_dir`` (replaced).
    ``condition_images`` (:func:`condition_images_for_cache`) feed the hint CNN of a ``"cnn"``
    method and are ignored by the others. Returns the ``run.json`` info plus ``history``."""
    from ctrlora.training.controlnet import ControlNetTrainConfig, train_condition

    m = method(spec.method)
    if m.embedding == "cnn" and condition_images is None:
        raise ValueError(f"method {m.name!r} reads the condition images: pass condition_images")
    seed = recipe.train.seed + spec.seed
    train = dataclasses.replace(recipe.train, learning_rate=float(spec.learning_rate), seed=seed)
    snaps = snapshot_steps(train.max_steps, snapshot_every) if m.snapshots else []
    if snaps:  # on_log fires every log_every steps (and at the last): make every snapshot one of them
        train = dataclasses.replace(train, log_every=math.gcd(train.log_every, *snaps))
    controlnet, bh = build_controlnet(m.name, backbone, condition, recipe.rank, seed, base_dir)
    out = _fresh(Path(out_dir))

    def on_log(row: dict) -> None:
        if int(row["step"]) in snaps:
            _save_weights(controlnet, m, condition, bh, out / "snapshots" / f"step_{int(row['step']):05d}",
                          {"step": int(row["step"])})

    result = train_condition(controlnet, backbone.unet, backbone.scheduler, cache, condition,
                             ControlNetTrainConfig(train, prompt_dropout=recipe.prompt_dropout), mode=m.mode,
                             checkpoint_dir=checkpoint_dir,
                             condition_images=condition_images if m.embedding == "cnn" else None,
                             max_pairs=recipe.max_pairs, on_log=on_log if snaps else None)
    info = {"method": m.name, "condition": condition, "learning_rate": float(spec.learning_rate),
            "seed": spec.seed, "train_seed": seed, "steps": train.max_steps, "batch_size": train.batch_size,
            "max_pairs": recipe.max_pairs, "prompt_dropout": recipe.prompt_dropout, "mode": m.mode,
            "init": m.init, "embedding": m.embedding, "rank": recipe.rank if m.mode == "adapter" else None,
            "trainable_params": int(sum(p.numel() for p in controlnet.parameters() if p.requires_grad)),
            "total_params": int(sum(p.numel() for p in controlnet.parameters())),
            "snapshot_steps": [s for s in snaps if _weights_written(out / "snapshots" / f"step_{s:05d}", m)]}
    if info["snapshot_steps"] != snaps:
        raise RuntimeError(f"{spec.key}: snapshots {sorted(set(snaps) - set(info['snapshot_steps']))} not written")
    _save_run(controlnet, m, condition, bh, out, info)
    return {**info, "history": result.history}


def _save_weights(controlnet, m: Method, condition: str, bh: str | None, folder: Path, extra: dict) -> None:
    """What a run trains, into ``folder``: the condition's adapter (adapter methods) or the whole
    ControlNet."""
    from ctrlora.models.adapters import save_adapter

    if m.mode == "adapter":
        save_adapter(controlnet, condition, folder, base_hash=bh, extra={"stage": "research", "method": m.name, **extra})
    else:
        controlnet.save_pretrained(folder)


def _weights_written(folder: Path, m: Method) -> bool:
    from ctrlora.models.adapters import ADAPTER_CONFIG

    return (folder / (ADAPTER_CONFIG if m.mode == "adapter" else "config.json")).is_file()


def _save_run(controlnet, m: Method, condition: str, bh: str | None, out: Path, info: dict) -> None:
    if m.mode == "adapter":
        if m.init != "base":  # the trained base is loaded from its own directory
            controlnet.save_pretrained(out / "controlnet")
        _save_weights(controlnet, m, condition, bh, out / "adapter", {"steps": info["steps"]})
    else:
        _save_weights(controlnet, m, condition, bh, out / "controlnet", {})
    (out / RUN_INFO).write_text(json.dumps(info, indent=1) + "\n")


def read_run(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a research run (no {RUN_INFO})")
    return json.loads(path.read_text())


def load_run(run_dir: str | Path, base_dir: str | Path | None = None, step: int | None = None):
    """``(controlnet, adapter)`` of a run, in eval mode: ``adapter`` is the name to generate with
    (the condition for adapter methods, ``"__base__"`` = the ControlNet itself otherwise). Adapter
    runs on the trained base need ``base_dir``; the adapter's recorded base hash is checked.
    ``step``: the run's snapshot at that step instead of its final weights."""
    from ctrlora.models.adapters import BASE_NAME, load_adapter
    from ctrlora.models.controlnet import CtrLoRAControlNet

    run = Path(run_dir)
    info = read_run(run)
    if step is not None:
        snaps = run_snapshots(run)
        if int(step) not in snaps:
            raise ValueError(f"{run}: no snapshot at step {step} (snapshots: {sorted(snaps)})")
    own = run / "controlnet"
    if info["mode"] != "adapter":
        return CtrLoRAControlNet.from_pretrained(own if step is None else snaps[int(step)]).eval(), BASE_NAME
    if not (own / "config.json").is_file() and base_dir is None:
        raise ValueError(f"{run}: adapter on the trained base: pass base_dir")
    controlnet = CtrLoRAControlNet.from_pretrained(own if (own / "config.json").is_file() else base_dir)
    load_adapter(controlnet, run / "adapter" if step is None else snaps[int(step)], name=info["condition"])
    return controlnet.eval(), info["condition"]


def run_snapshots(run_dir: str | Path) -> dict[int, Path]:
    """``{step: snapshot directory}`` of a snapshot run (load with :func:`load_run` ``step=``)."""
    run = Path(run_dir)
    return {int(s): run / "snapshots" / f"step_{int(s):05d}" for s in read_run(run).get("snapshot_steps", [])}


def select_learning_rates(scores: Mapping[str, Mapping[float, float]]) -> dict[str, dict[str, Any]]:
    """Per method, the learning rate with the highest **validation** fidelity (``{method: {rate:
    mean validation fidelity}}``; a tie goes to the lower rate). ``at_edge`` flags a choice at the
    end of the swept range (the optimum may lie outside it)."""
    out = {}
    for name, by_rate in scores.items():
        if len(by_rate) < 1:
            raise ValueError(f"method {name!r}: no swept rates")
        rates = sorted(float(r) for r in by_rate)
        vals = {float(r): float(v) for r, v in by_rate.items()}
        if any(math.isnan(v) for v in vals.values()):
            raise ValueError(f"method {name!r}: NaN validation fidelity {vals}")
        best = max(rates, key=lambda r: (vals[r], -r))
        out[name] = {"learning_rate": best, "validation_fidelity": vals[best],
                     "at_edge": len(rates) > 1 and best in (rates[0], rates[-1]),
                     "swept": {f"{r:g}": vals[r] for r in rates}}
    return out


def sweep_specs(rates: Mapping[str, Sequence[float]], methods: Sequence[str]) -> list[RunSpec]:
    """Seed-0 runs of every method at each of its rates."""
    missing = [m for m in methods if not rates.get(m)]
    if missing:
        raise ValueError(f"no learning rates for methods {missing}")
    return [RunSpec(m, float(r), 0) for m in methods for r in rates[m]]
