"""One short, linear training loop shared by every trainer (backbone, base, adapters, baselines).

Design choices, in the order they matter:

* **Step-addressed randomness.** Everything random about step ``s`` (which samples, which
  condition, the noise, the timesteps, the prompt dropout) comes from a generator seeded by
  ``(seed, s, process_index)``. A run killed after its checkpoint at step ``k`` and resumed
  therefore sees exactly the batches and noise the uninterrupted run saw: the losses after the
  resume are the same, with no data-loader state to save.
* **accelerate** does devices, mixed precision, gradient accumulation, DDP and checkpoint state
  (model, optimiser, scaler); the same code runs under ``accelerate launch`` on several GPUs.
* **Several processes, one global batch** (``Trainer(global_batch=True)``, the ControlNet
  trainers): every process draws the same step's randomness for the whole ``batch_size`` and
  trains on its share (:meth:`Trainer.share`); DDP averages the gradients of the equal shares,
  which is the gradient of the whole batch. So P processes train what one process trains with
  the same ``batch_size`` (up to float summation order), and a checkpoint resumes under any
  process count that divides the batch. Logged losses are averaged over the processes; the
  main process writes the checkpoint (each process adds its own RNG-state file, see
  :meth:`Trainer.save_checkpoint`). Without ``global_batch`` each process draws its own
  ``batch_size`` samples (stream ``process_index``), the global batch growing with P.
* The caller supplies ``loss_fn(model, step, generator) -> (loss, logs)``; the loop owns the
  optimiser step, clipping, the learning-rate schedule (linear warm-up, then constant or cosine
  down to ``min_lr_ratio``), an optional exponential moving average of the trained weights,
  logging, checkpoints and the progress bar.
* **EMA** (``ema_decay > 0``): a shadow copy of the trained tensors, updated after every
  optimiser step and checkpointed with it; at the end of :meth:`Trainer.fit` the shadow values
  are copied into the model, so what is saved afterwards is the averaged model. Averaging is the
  cheapest sample-quality gain for diffusion models trained briefly at a high learning rate.
* **Memory options** (all off by default): ``mixed_precision`` bf16 / fp16 (accelerate
  autocast), ``gradient_checkpointing`` (the trainers recompute the activations of the models'
  blocks in the backward pass), ``optimizer: adamw8bit`` (bitsandbytes' 8-bit AdamW states, an
  optional extra) and ``cast_frozen`` (frozen models stored in the mixed-precision dtype).
  ``memory_preset`` in a params ``train`` section sets a named group of them
  (:data:`MEMORY_PRESETS`); options written beside it win.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import math

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")
# Named groups of memory options (``train: {memory_preset: 16gb}``); explicit options win. "16gb"
# is the recipe that trains an SD 1.5 adapter (512 px, rank 128) on a 16 GB card: bf16 autocast,
# checkpointed UNet and ControlNet, the frozen UNet in bf16, 8-bit AdamW states. "16gb_no_bnb" is
# the same without the bitsandbytes extra (fp32 AdamW states: ~0.3 GB more for a rank-128 adapter).
MEMORY_PRESETS: dict[str, dict[str, Any]] = {
    "16gb": {"mixed_precision": "bf16", "gradient_checkpointing": True, "cast_frozen": True,
             "optimizer": "adamw8bit"},
    "16gb_no_bnb": {"mixed_precision": "bf16", "gradient_checkpointing": True, "cast_frozen": True,
                    "optimizer": "adamw"},
}

LossFn = Callable[[torch.nn.Module, int, torch.Generator], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # "constant" | "cosine" (after the warm-up)
    min_lr_ratio: float = 0.0  # cosine ends at learning_rate * min_lr_ratio
    ema_decay: float = 0.0  # 0 = no EMA
    gradient_checkpointing: bool = False  # recompute block activations in backward (trainers apply it)
    optimizer: str = "adamw"  # "adamw" | "adamw8bit" (bitsandbytes, optional extra)
    cast_frozen: bool = False  # frozen models in the mixed-precision dtype (needs mixed_precision)

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.cast_frozen and self.mixed_precision == "no":
            raise ValueError("cast_frozen needs mixed_precision bf16 or fp16 (autocast runs the half-precision "
                             "frozen weights)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or (self.warmup_steps and self.warmup_steps >= self.max_steps):
            raise ValueError(f"warmup_steps must be in [0, max_steps), got {self.warmup_steps}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``learning_rate`` at optimiser step ``step`` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def half_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``mixed_precision`` (None without mixed precision)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From a params ``train`` section; ``memory_preset: NAME`` expands to
        ``MEMORY_PRESETS[NAME]`` under the section's own options."""
        d = dict(d)
        preset = d.pop("memory_preset", None)
        if preset is not None:
            if preset not in MEMORY_PRESETS:
                raise ValueError(f"unknown memory_preset {preset!r}; known: {sorted(MEMORY_PRESETS)}")
            d = {**MEMORY_PRESETS[preset], **d}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known | {'memory_preset'})}")
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)


def make_accelerator(cfg: TrainConfig, **kwargs) -> Accelerator:
    """An Accelerator for one training run of ``cfg``.

    accelerate keeps one process-wide state and refuses a second Accelerator with another
    ``mixed_precision``; a stage that trains two models in sequence with different precisions
    (the backbone: VAE in bf16, UNet in fp32, measured faster that way on CPU) clears that state
    between runs. The distributed (partial) state is kept, so this is safe under ``accelerate
    launch``: only the precision setting is renewed."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", cfg.mixed_precision)) != cfg.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.gradient_accumulation_steps, **kwargs)


def step_generator(seed: int, step: int, stream: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator for everything random in one step (see module docstring)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))
    return g


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over ``params``: torch's, or bitsandbytes' 8-bit one (``optimizer: adamw8bit``;
    its moment estimates take 2 bytes per weight instead of 8)."""
    kwargs: dict[str, Any] = dict(lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError("optimizer 'adamw8bit' needs bitsandbytes, which is not installed (pip install "
                          "'ctrlora-dental[bnb]'), or set optimizer: adamw") from exc
    return bitsandbytes.optim.AdamW8bit(params, **kwargs)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    steps_run: int = 0


class Trainer:
    """Owns the accelerator, the optimiser, checkpoints and the loop.

    ``params`` are the tensors to optimise (they must belong to ``model``); everything else in
    ``model`` should have ``requires_grad=False``. ``global_batch``: ``batch_size`` is the batch
    of all processes together and ``loss_fn`` trains on :meth:`share` of what it draws (module
    docstring); needs ``batch_size`` divisible by the number of processes.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, params: Iterable[torch.nn.Parameter],
                 checkpoint_dir: str | Path | None = None, accelerator: Accelerator | None = None,
                 global_batch: bool = False):
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.global_batch = global_batch
        procs = self.accelerator.num_processes
        if global_batch and cfg.batch_size % procs:
            raise ValueError(f"batch_size {cfg.batch_size} is the batch of all {procs} processes together "
                             f"and must be divisible by their number")
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter with requires_grad=True was given")
        self.params = params
        optimizer = make_optimizer(cfg, params)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.ema: list[torch.Tensor] | None = (
            [p.detach().clone().float() for p in self.params] if cfg.ema_decay > 0 else None)

    def share(self) -> slice | None:
        """This process's rows of a ``global_batch`` batch of ``batch_size`` (``None`` with one
        process: everything, no slicing)."""
        acc = self.accelerator
        if not self.global_batch or acc.num_processes == 1:
            return None
        per = self.cfg.batch_size // acc.num_processes
        return slice(acc.process_index * per, (acc.process_index + 1) * per)

    def _global_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Each log value averaged over the processes (every process logs the same keys)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return logs
        keys = sorted(logs)
        values = acc.reduce(torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=acc.device), "mean")
        return {k: float(v) for k, v in zip(keys, values.tolist())}

    # -- learning rate and EMA -----------------------------------------------------------------
    def _set_lr(self, step: int) -> None:
        lr = self.cfg.learning_rate * self.cfg.lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        # the usual warm-up of the decay: early steps average over fewer past values
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        for shadow, p in zip(self.ema, self.params):
            shadow.lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_ema_to_model(self) -> None:
        """Put the averaged weights into the model (a no-op without EMA)."""
        if self.ema is None:
            return
        for shadow, p in zip(self.ema, self.params):
            p.copy_(shadow.to(p.dtype))

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir or not self.checkpoint_dir.exists():
            return []
        done = [p for p in self.checkpoint_dir.glob("step_*") if (p / "trainer_state.json").exists()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def save_checkpoint(self, step: int, history: list[dict]) -> None:
        """Write the checkpoint of ``step`` as ``step_<n>``: complete or absent, never half-written.

        accelerate's ``save_state`` has no barrier of its own on this path: every rank calls
        ``os.makedirs(output_dir, exist_ok=True)``, the main process writes the model, optimiser and
        scaler state, and every rank writes its own ``random_states_<rank>.pkl``. So the folder must
        be ready before any rank enters ``save_state`` and must not move until all have left it:

        1. the main process removes temporary folders a killed run left and creates an empty
           ``.tmp_step_<n>``; barrier (no rank writes into a folder that is about to be removed);
        2. every rank runs ``save_state`` into it; barrier (every rank's part is in);
        3. the main process adds the EMA and ``trainer_state.json``, renames the folder to
           ``step_<n>`` (atomic: :meth:`_checkpoints` only lists folders with a trainer state) and
           prunes old checkpoints; barrier (no rank runs ahead into the next save or exits while
           the checkpoint is still being finished).
        """
        if not self.checkpoint_dir:
            return
        acc = self.accelerator
        target = self.checkpoint_dir / f"step_{step:07d}"
        tmp = self.checkpoint_dir / f".tmp_step_{step:07d}"
        if acc.is_main_process:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.checkpoint_dir.glob(".tmp_step_*"):
                shutil.rmtree(stale)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.ema is not None:
                save_file({f"p{i}": t.contiguous() for i, t in enumerate(self.ema)}, str(tmp / "ema.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": step, "history": history, "config": asdict(self.cfg)}))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def try_resume(self) -> tuple[int, list[dict]]:
        ckpts = self._checkpoints()
        if not ckpts:
            return 0, []
        latest = ckpts[-1]
        self.accelerator.load_state(str(latest))
        if self.ema is not None:
            saved = load_file(str(latest / "ema.safetensors"))
            self.ema = [saved[f"p{i}"] for i in range(len(self.ema))]
        state = json.loads((latest / "trainer_state.json").read_text())
        if self.accelerator.is_local_main_process:  # once per machine, as accelerator.print did
            log.info("resuming from %s (step %s)", latest, state["step"])
        return int(state["step"]), list(state["history"])

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, loss_fn: LossFn, desc: str = "train", on_log: Callable[[dict], None] | None = None) -> TrainResult:
        """Train to ``max_steps``, resuming from the latest checkpoint. ``on_log(row)`` is called
        every ``log_every`` steps (and at the last) on the main process only: callers write files
        from it (snapshots), and the row's values are already averaged over the processes."""
        cfg, acc = self.cfg, self.accelerator
        start, history = self.try_resume()
        result = TrainResult(history=history, resumed_from=start or None)
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=start, desc=desc, disable=not acc.is_local_main_process,
                   dynamic_ncols=True, mininterval=1.0)
        running: dict[str, float] = {}
        for step in range(start + 1, cfg.max_steps + 1):
            logs_sum: dict[str, float] = {}
            self._set_lr(step)
            for micro in range(cfg.gradient_accumulation_steps):
                stream = micro * 1000 + (0 if self.global_batch else acc.process_index)
                gen = step_generator(cfg.seed, step, stream=stream)
                with acc.accumulate(self.model):
                    loss, logs = loss_fn(self.model, step, gen)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                logs = self._global_logs({"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}})
                for k, v in logs.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + v / cfg.gradient_accumulation_steps
            if self.ema is not None:
                self._update_ema(step)
            row = {"step": step, **logs_sum}
            history.append(row)
            result.steps_run += 1
            for k, v in logs_sum.items():
                running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.items() if k == "loss"})
                if on_log and acc.is_main_process:
                    on_log(row)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.max_steps:
                self.save_checkpoint(step, history)
        bar.close()
        if self.checkpoint_dir and result.steps_run:
            self.save_checkpoint(cfg.max_steps, history)
        self.copy_ema_to_model()
        self.model.eval()
        return result

    def unwrap(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

