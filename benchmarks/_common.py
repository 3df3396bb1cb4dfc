"""Small helpers shared by the benchmarks: per-step clocks, summaries, environment notes.

Nothing here imports torch at module level, so a benchmark's parent process (which only starts
children and merges their JSON) stays light.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))


class StepClock:
    """Use as the trainer's ``on_log`` callback with ``log_every=1``: it is called once at the end
    of every optimiser step (after ``optimizer.step()``), so the gaps between calls are whole
    training steps (data, forward, backward, clipping, optimiser). On CUDA it synchronises first,
    so queued kernels are inside the step they belong to."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.stamps: list[float] = []
        self.losses: list[float] = []

    def __call__(self, row: dict) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        if "loss" in row:
            self.losses.append(float(row["loss"]))

    def step_times(self, warmup: int) -> list[float]:
        """Durations of the steps after the first ``warmup`` (``warmup`` must be >= 1: step 1 has
        no stamp before it)."""
        if warmup < 1:
            raise ValueError("warmup must be at least 1 (the first step has no start stamp)")
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]  # gaps[i] = step i + 2
        return gaps[warmup - 1:]


def summary(times: list[float]) -> dict:
    if not times:
        raise ValueError("no timed steps (steps must be >= 1)")
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


def alternating(names: list[str], rounds: int, run_one) -> dict[str, list]:
    """``{name: [run_one(name) per round]}`` in ABBA order (the order flips every round), so a
    drift of the machine's speed during a benchmark does not favour one variant."""
    runs: dict[str, list] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            runs[n].append(run_one(n))
    return runs


def save_json(result: dict, out: str | Path | None) -> str:
    """``result`` as indented JSON text, also written to ``out`` (folders made) when given."""
    import json

    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def set_threads(device: str, threads: int | None) -> int:
    """On CPU, fix torch's intra-op threads (default 1: the machine is shared; both variants of a
    benchmark always run under the same setting). Returns the number in force."""
    import torch

    if device == "cpu":
        torch.set_num_threads(int(threads or 1))
    elif threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {device!r}")


def mixed_precision(device: str, dtype: str) -> str:
    """accelerate's ``mixed_precision`` for ``--dtype`` (autocast; the weights stay fp32)."""
    table = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
    if dtype not in table:
        raise SystemExit(f"--dtype must be one of {sorted(table)}, got {dtype!r}")
    if device == "cpu" and dtype == "fp16":
        raise SystemExit("--dtype fp16 needs --device cuda (fp16 autocast is not supported on CPU here)")
    return table[dtype]


def environment(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        import diffusers
        import peft

        env["diffusers"], env["peft"] = diffusers.__version__, peft.__version__
    except ImportError:
        pass
    return env


def use_device(device: str) -> None:
    """Make accelerate (which picks CUDA whenever it exists) use ``device``."""
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    else:
        os.environ.pop("ACCELERATE_USE_CPU", None)


# ---------------------------------------------------------------------------- the trained default
# Benchmarks that measure the default run's models (``make repro``'s ``models/`` and ``data/``)
# find them through ``params.yaml`` ``paths``, as the stages do.
def params_yaml() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def repo_path(value: str) -> Path:
    return (ROOT / value).resolve()


def trained_backbone(params: dict) -> Path:
    """The backbone folder the default run uses: the directory the ``backbone`` stage recorded
    (the foundation's tiny backbone, or a local SD 1.5)."""
    from pipelines.stages.common import resolve_backbone

    return resolve_backbone(repo_path(params["paths"]["backbone"]))


def adapter_dirs(params: dict, conditions: list[str]) -> dict[str, Path]:
    """Each condition's trained adapter: the base's for a base condition, else train_adapter's."""
    paths = params["paths"]
    base_conditions = set(params["train_base"]["conditions"])
    out = {}
    for c in conditions:
        d = repo_path(paths["base"]) / "adapters" / c if c in base_conditions else repo_path(paths["adapters"]) / c
        if not (d / "adapter_config.json").is_file():
            raise SystemExit(f"{d}: no trained adapter for {c!r} (run the default pipeline first)")
        out[c] = d
    return out


def trained_detectors(params: dict, conditions: list[str]) -> dict:
    """The ``detectors`` stage's re-detectors (read only; never trained here)."""
    from ctrlora.evaluation.detectors import load_detector
    from ctrlora.evaluation.fidelity import DETECTED_CONDITIONS

    root = repo_path(params["paths"]["detectors"])
    out = {}
    for c in conditions:
        if c in DETECTED_CONDITIONS:
            if not (root / c).is_dir():
                raise SystemExit(f"{root / c}: no re-detector for {c!r} (run the `detectors` stage first)")
            out[c] = load_detector(root / c)
    return out


def add_validation_args(p, evaluate: dict, scans: int) -> None:
    """The options of a benchmark that generates on the validation split of the trained default:
    scans, guidance, seed and batch (evaluate's gate pass by default), bootstrap, device, threads."""
    p.add_argument("--scans", type=int, default=scans, help="first N validation scans (scan-id order)")
    p.add_argument("--guidance", type=float, default=float(evaluate.get("gate_guidance", 1.0)))
    p.add_argument("--seed", type=int, default=int(evaluate["sampling"]["seed"]))
    p.add_argument("--batch", type=int, default=int(evaluate["sampling"]["batch_size"]))
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default 1)")


def run_and_save(run, args) -> dict:
    """A benchmark's ``main``: ``run(args)``, its JSON written to ``args.out``."""
    report = run(args)
    save_json(report, args.out)
    print(f"-> {args.out}")
    return report


def trained_validation_setup(params: dict, conditions: list[str], scans: int, device: str):
    """``(data, detectors, pipe)`` for a benchmark on the validation split of the trained default:
    the first ``scans`` validation scans with ``conditions``, their trained re-detectors, and a
    pipeline over the trained backbone and base with each condition's adapter, on ``device``."""
    from ctrlora.evaluation.loading import load_models, load_split
    from ctrlora.sampling import CtrLoRAPipeline

    paths = params["paths"]
    models = load_models(trained_backbone(params), repo_path(paths["base"]), adapter_dirs(params, conditions))
    sources = [repo_path(paths["rendered"]), repo_path(paths["scans"])]
    data = load_split(repo_path(paths["prepared"]), "validation", conditions, sources, scans, progress=False)
    pipe = CtrLoRAPipeline.from_components(models.backbone, models.controlnet).to(device)
    pipe.set_progress_bar_config(disable=True)
    return data, trained_detectors(params, conditions), pipe
