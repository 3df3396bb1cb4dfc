"""``ctrlora-ops studio``: a local web page to compose conditions on the registry's adapters,
compare two versions of one adapter on the same maps and seeds, and move ``champion``.

    ctrlora-ops studio [--host 127.0.0.1] [--port 7860] [--adapter NAME=DIR ...]

What it serves (FastAPI on uvicorn, one page, no external assets):

* the registered models ``ctrlora-<condition>`` of the MLflow registry (``MLFLOW_TRACKING_URI``,
  default the repo's sqlite store): versions, aliases, dataset hash, metrics, gate report; plus
  adapter folders given with ``--adapter`` (or, when the registry holds nothing, the repo's own
  ``models/`` folders);
* a condition map per chosen condition: an upload, the map of a test-split scan (then its
  photograph is the ground truth and every image is scored against it), or, for a derived
  condition (canny, grayscale, blur, palette), the map computed from an uploaded photograph;
* the registered combinations ``ctrlora+<c1>+<c2>...`` (:mod:`pipelines.registry.combination`):
  source versions, weights, recipe; a generation from one takes each of its conditions' maps from
  a validation scan and draws through the registered model's own pyfunc
  (:class:`pipelines.registry.pyfunc.CtrLoRAPyfunc`, as serving and ``ctrlora-ops generate
  --combination`` draw), at its recipe unless the page overrides steps, sampler and guidance;
* generation in ONE worker thread (requests only queue a job and poll it), with the sampler's
  steps as progress;
* promotion through :func:`pipelines.registry.registration.promote` (the paired comparison with
  the champion on the frozen benchmark, decided by ``params.yaml`` ``register.gate``), only with
  an explicit confirmation.

Every input is checked before anything runs; a bad one is answered with HTTP 400 and one
sentence naming the file or field and the rule it broke, which the page shows.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import functools
import io
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from types import SimpleNamespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctrlora.data.conditions import TableView
from pipelines.settings import ADAPTER_ROOTS, BACKBONE_DIR, BASE_DIR, PATHS, REPO_ROOT, load_params
from pipelines.registry.frozen_benchmark import SPLIT as PROMOTION_SPLIT  # the split promotions read

# Request limits (the page offers the same ranges).
LIMITS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 3.0), "steps": (1, 200), "guidance": (0.0, 20.0), "num_images": (1, 8),
    "seed": (0, 2**31 - 1), "strength": (0.0, 2.0),
}
MAX_UPLOAD_BYTES = 8 * 2**20
SIDE_RANGE = (16, 2048)        # pixels per side of an uploaded image
SQUARE_TOLERANCE = 0.10        # the models draw square images; maps must be square within 10 %
MAX_UPLOADS = 32               # uploads kept in memory (oldest dropped first)
KEEP_SIDE = 1024               # uploads are kept at most this large (the models draw 64-512 px)
MAX_PIPELINES = 4              # loaded pipelines kept (oldest dropped first)
MAX_SCANS = 60                 # promotion-split scans offered on the page
SAMPLERS = ("ddim", "dpm", "dpm_karras", "unipc")
# conditions computed from a photograph: the derived entries of params.yaml `conditions`
DERIVED = TableView(lambda t: {n: c for n, c in t.items() if c.kind == "derived"})
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
FOLDER_PREFIX = "dir:"


class StudioError(ValueError):
    """A request the studio refuses; the message is shown on the page as it is."""


# ----------------------------------------------------------------------------- images

def decode_upload(data_url: Any, filename: str) -> np.ndarray:
    """A ``data:`` URL of a PNG or JPEG file → RGB uint8 ``H×W×3``; refuses anything else."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data_url, str) or "," not in data_url:
        raise StudioError(f"{filename}: empty upload")
    head, b64 = data_url.split(",", 1)
    if not head.startswith("data:") or ";base64" not in head:
        raise StudioError(f"{filename}: not a base64 data URL")
    if len(b64) * 3 // 4 > MAX_UPLOAD_BYTES:
        raise StudioError(f"{filename}: larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StudioError(f"{filename}: not valid base64 ({exc})") from exc
    if not (raw.startswith(PNG_MAGIC) or raw.startswith(JPEG_MAGIC)):
        raise StudioError(f"{filename}: not a PNG or JPEG image (only .png / .jpg maps are accepted)")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if not (SIDE_RANGE[0] <= min(w, h) and max(w, h) <= SIDE_RANGE[1]):
                raise StudioError(f"{filename}: {w}×{h} px; each side must lie in "
                                  f"{SIDE_RANGE[0]}–{SIDE_RANGE[1]} px")
            if abs(w - h) > SQUARE_TOLERANCE * max(w, h):
                raise StudioError(f"{filename}: {w}×{h} px is not square (the models draw square "
                                  f"images; crop it to 1:1)")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except StudioError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise StudioError(f"{filename}: the image cannot be decoded ({exc})") from exc


def resize_u8(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def map_at(spec: "CondSpec", size: int) -> np.ndarray:
    """The condition map at the model's size; a derived one is computed from the photograph
    resized first, as ``prepare`` derives it from the normalised photo."""
    if not spec.derive:
        return resize_u8(spec.image, size)
    from ctrlora.data.conditions import encode_u8
    from ctrlora.data.scan import Scan

    return encode_u8(spec.condition, Scan(scan_id="upload", photo=resize_u8(spec.image, size)))


def png_data_url(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _number(body: dict, key: str, default: float, kind: type = float) -> float:
    value = body.get(key, default)
    lo, hi = LIMITS[key]
    try:
        number = kind(value)
        if kind is int and float(value) != number:
            raise ValueError
    except (TypeError, ValueError):
        raise StudioError(f"{key}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not lo <= number <= hi:
        raise StudioError(f"{key} {number} is out of range [{lo:g}, {hi:g}]")
    return number


# ----------------------------------------------------------------------------- catalogue

@dataclass
class Adapter:
    """One adapter a user can pick: a registry version or a folder."""

    ref: str                    # models:/ctrlora-<c>/<v>  or  dir:<path>
    condition: str
    label: str
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)   # dataset hash, metrics, gate report ...

    def public(self) -> dict[str, Any]:
        return {"ref": self.ref, "condition": self.condition, "label": self.label,
                "version": self.version, "aliases": self.aliases, **self.info}


@dataclass
class Parts:
    backbone: Path
    base: Path
    adapter: Path


class Catalogue:
    """The adapters on offer and where their files lie (registry versions are downloaded once,
    into ``cache``)."""

    def __init__(self, folders: dict[str, Path], backbone: Path, base: Path, cache: Path,
                 use_registry: bool = True):
        self.folders, self.backbone, self.base, self.cache = folders, backbone, base, cache
        self.use_registry = use_registry
        self._parts: dict[str, Parts] = {}
        self._lock = threading.Lock()
        self.registry_error: str | None = None

    def adapters(self) -> list[Adapter]:
        out: list[Adapter] = []
        self.registry_error = None
        if self.use_registry:
            try:
                from pipelines.registry import models as registry
                rows = registry.list_models()
            except Exception as exc:  # an unreachable store: the page says so, folders still work
                rows, self.registry_error = [], f"MLflow registry unavailable: {exc}"
            for r in rows:
                aliases = [str(a) for a in (r.get("aliases") or [])]
                cond, ver = str(r.get("condition")), str(r.get("version"))
                label = f"v{ver}" + (f" ({', '.join(aliases)})" if aliases else "")
                info = {"model": r.get("model"), "dataset_hash": r.get("dataset_hash"),
                        "adapter_hash": r.get("adapter_hash"), "git_commit": r.get("git_commit"),
                        "metrics": {k: v for k, v in (r.get("metrics") or {}).items()
                                    if isinstance(v, (int, float))},
                        "gate": r.get("gate"), "gate_reason": r.get("gate_reason"), "source": "registry",
                        "tags": {k: str(r[k]) for k in ("benchmark_version", "gate_champion_version", "gate_metric",
                                                        "gate_n_scans", "gate_delta", "gate_low", "gate_high",
                                                        "gate_weight", "recipe", "forced", "forced_reason")
                                 if r.get(k) is not None}}
                out.append(Adapter(f"models:/{r.get('model')}/{ver}", cond, label, ver, aliases, info))
        for name, d in sorted(self.folders.items()):
            out.append(Adapter(f"{FOLDER_PREFIX}{d}", name, f"folder {_short(d)}",
                               info={"source": "folder", "metrics": {}}))
        return out

    def combinations(self) -> list[dict[str, Any]]:
        """The registered combinations, one row per version: ref, label, aliases, conditions,
        source versions, weights and sampler of its recipe."""
        if not self.use_registry:
            return []
        try:
            from pipelines.registry.combination import list_combinations
            rows = list_combinations()
        except Exception as exc:  # an unreachable store: said once, beside the adapters' error
            self.registry_error = self.registry_error or f"MLflow registry unavailable: {exc}"
            return []
        out = []
        for r in rows:
            recipe = dict(r.get("recipe") or {})
            aliases = [str(a) for a in r.get("aliases") or []]
            ver = str(r["version"])
            sources = {str(c): str(u) for c, u in sorted((r.get("sources") or {}).items())}
            out.append({"ref": f"models:/{r['model']}/{ver}", "model": r["model"], "version": ver,
                        "label": f"{r['model']} v{ver}" + (f" ({', '.join(aliases)})" if aliases else ""),
                        "aliases": aliases, "conditions": sorted(sources) or sorted(r.get("conditions") or []),
                        "sources": sources,
                        "source_versions": {c: u.rsplit("/", 1)[-1] for c, u in sources.items()},
                        "weights": {str(c): float(w) for c, w in (recipe.get("weights") or {}).items()},
                        "recipe": {k: recipe[k] for k in ("scheduler", "steps", "guidance_scale") if k in recipe},
                        "weights_source": r.get("weights_source"), "reason": r.get("reason"),
                        "git_commit": r.get("git_commit")})
        return out

    def find_combination(self, ref: Any) -> dict[str, Any]:
        for c in self.combinations():
            if c["ref"] == ref:
                return c
        raise StudioError(f"combination {ref!r} is not on offer (registered ctrlora+<c1>+<c2> versions only)")

    def find(self, ref: str) -> Adapter:
        for a in self.adapters():
            if a.ref == ref:
                return a
        raise StudioError(f"adapter {ref!r} is not on offer (registered versions and --adapter folders only)")

    def parts(self, ref: str) -> Parts:
        with self._lock:
            if ref in self._parts:
                return self._parts[ref]
            if ref.startswith(FOLDER_PREFIX):
                p = Parts(self.backbone, self.base, Path(ref[len(FOLDER_PREFIX):]))
            else:
                from pipelines.registry.models import resolve_adapter_uri

                name_ver = ref[len("models:/"):].replace("/", "-v")
                dst = self.cache / name_ver
                shutil.rmtree(dst, ignore_errors=True)
                dst.mkdir(parents=True)
                r = resolve_adapter_uri(ref, dst)
                p = Parts(r.backbone, r.base, r.adapter)
            self._parts[ref] = p
            return p


def _short(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def repo_folders(root: Path = REPO_ROOT) -> dict[str, Path]:
    """The repo's own adapter folders (``models/base/adapters/<c>``, ``models/adapters/<c>``)."""
    from ctrlora.models.adapters import ADAPTER_WEIGHTS

    out = {}
    for rel in ADAPTER_ROOTS:
        for d in sorted((root / rel).glob("*")):
            if (d / ADAPTER_WEIGHTS).is_file():
                out[d.name] = d
    return out


# ----------------------------------------------------------------------------- scans

class PromotionScans:
    """The prepared split promotions are decided on (the frozen benchmark's, validation): scan
    ids, captions, condition maps, photographs. Never the test split, which only the report reads."""

    def __init__(self, prepared: Path, scan_sources: list[Path]):
        self.prepared, self.scan_sources = prepared, scan_sources
        self.captions: dict[str, str] = {}
        self.conditions: dict[str, set[str]] = {}
        root = prepared / "conditions"
        for pairs in sorted(root.glob("*/pairs.jsonl")) if root.is_dir() else []:
            for line in pairs.read_text().splitlines():
                row = json.loads(line) if line.strip() else {}
                if row.get("split") == PROMOTION_SPLIT:
                    sid = str(row["scan_id"])
                    self.captions.setdefault(sid, str(row.get("caption", "")))
                    self.conditions.setdefault(sid, set()).add(pairs.parent.name)

    def ids(self) -> list[str]:
        return sorted(self.captions)[:MAX_SCANS]

    def vocabulary(self) -> list[str]:
        from ctrlora.data.captions import caption_words

        words = {w for c in self.captions.values() for w in caption_words(c)}
        return sorted(words)

    def require(self, sid: Any) -> str:
        if not isinstance(sid, str) or sid not in self.captions:
            raise StudioError(f"scan {sid!r} does not exist in {self.prepared} ({PROMOTION_SPLIT} split)")
        return sid

    def image(self, sid: str, what: str) -> np.ndarray:
        from ctrlora.data.files import read_png

        sid = self.require(sid)
        if what == "photo":
            return read_png(self.prepared / "photos" / f"{sid}.png", "RGB")
        if what not in self.conditions[sid]:
            raise StudioError(f"scan {sid} has no {what!r} map")
        return read_png(self.prepared / "conditions" / what / f"{sid}.png", "RGB")

    def map_file(self, sid: Any, condition: str) -> Path:
        """The scan's prepared ``condition`` map file, as a client would send it."""
        sid = self.require(sid)
        if condition not in self.conditions[sid]:
            raise StudioError(f"scan {sid} has no {condition!r} map")
        return self.prepared / "conditions" / condition / f"{sid}.png"


# ----------------------------------------------------------------------------- jobs

@dataclass
class Job:
    id: str
    kind: str
    state: str = "queued"            # queued | running | done | error
    done: int = 0
    total: int = 1
    message: str = "queued"
    result: dict | None = None
    error: str | None = None

    def public(self) -> dict:
        return {"id": self.id, "kind": self.kind, "state": self.state, "done": self.done,
                "total": self.total, "message": self.message, "result": self.result, "error": self.error}


def _count_steps(sched, job: Job):
    """``sched`` with each ``step`` call advancing ``job.done`` (the page's progress bar)."""
    step = sched.step

    @functools.wraps(step)
    def counted(*args, **kwargs):
        out = step(*args, **kwargs)
        job.done += 1
        return out

    sched.step = counted
    return sched


class Jobs:
    """One worker thread runs the jobs in order; the web requests only submit and poll."""

    def __init__(self):
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: list[tuple[Job, Callable[[Job], dict]]] = []
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="studio-generation", daemon=True)
        self._thread.start()

    def submit(self, kind: str, fn: Callable[[Job], dict]) -> Job:
        job = Job(uuid.uuid4().hex[:12], kind)
        with self._cv:
            self._jobs[job.id] = job
            while len(self._jobs) > 50:
                self._jobs.popitem(last=False)
            self._queue.append((job, fn))
            self._cv.notify()
        return job

    def get(self, job_id: str) -> Job:
        with self._cv:
            if job_id not in self._jobs:
                raise StudioError(f"no job {job_id!r}")
            return self._jobs[job_id]

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                job, fn = self._queue.pop(0)
            job.state, job.message = "running", "loading models"
            try:
                job.result = fn(job)
                job.state, job.message, job.done = "done", "done", job.total
            except StudioError as exc:
                job.state, job.error = "error", str(exc)
            except Exception as exc:  # shown as one line on the page; the trace goes to the log
                traceback.print_exc()
                job.state, job.error = "error", f"generation failed: {type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- generation

@dataclass
class CondSpec:
    condition: str
    ref: str
    weight: float
    image: np.ndarray          # uint8 H×W×3: the map, or the photograph it is derived from
    from_scan: bool
    derive: bool = False       # compute the map from ``image`` at the model's size


@dataclass
class Request:
    conds: list[CondSpec]
    scan: str | None
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    guidance: float
    seed: int
    num_images: int
    strength: float
    compare: tuple[str, str, str] | None = None     # (condition, ref a, ref b)


@dataclass
class ComboRequest:
    """A generation from a registered combination: every condition's map from ``scan``."""

    ref: str
    label: str
    conditions: list[str]       # the combination's order (the order its pyfunc draws them in)
    weights: dict[str, float]
    scan: str
    prompt: str
    seed: int
    num_images: int
    sampling: dict[str, Any]    # steps / guidance_scale / scheduler overriding the recipe ({}: the recipe)


class Engine:
    """Loads pipelines (kept for reuse) and runs them, reporting sampler steps to a job."""

    def __init__(self, catalogue: Catalogue, device: str | None, detectors_dir: Path | None,
                 threads: int | None = None):
        self.catalogue, self.device, self.detectors_dir = catalogue, device, detectors_dir
        self.threads = threads
        self._pipes: OrderedDict[tuple, Any] = OrderedDict()
        self._hashes: dict[tuple[str, Path], str] = {}
        self._detectors: dict[str, Any] = {}

    def _digest(self, kind: str, path: Path) -> str:
        from ctrlora.data.hashing import dvc_dir_md5
        from ctrlora.models.backbone import backbone_hash

        key = (kind, Path(path))
        if key not in self._hashes:
            self._hashes[key] = backbone_hash(path) if kind == "backbone" else dvc_dir_md5(Path(path))
        return self._hashes[key]

    def pipeline(self, adapters: dict[str, str]):
        """The pipeline holding ``{condition: ref}``; every adapter must share backbone and base."""
        from ctrlora.sampling import CtrLoRAPipeline

        key = tuple(sorted(adapters.items()))
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        parts = {c: self.catalogue.parts(ref) for c, ref in adapters.items()}
        first_c, first = next(iter(parts.items()))
        for c, p in parts.items():
            for kind in ("backbone", "base"):
                if self._digest(kind, getattr(p, kind)) != self._digest(kind, getattr(first, kind)):
                    raise StudioError(f"{c} ({adapters[c]}) was registered with another {kind} than "
                                      f"{first_c} ({adapters[first_c]}); they cannot be combined")
        pipe = CtrLoRAPipeline.from_pretrained_parts(first.backbone, first.base,
                                                     {c: p.adapter for c, p in parts.items()},
                                                     device=self._torch_device())
        self._pipes[key] = pipe
        while len(self._pipes) > MAX_PIPELINES:
            self._pipes.popitem(last=False)
        return pipe

    def _torch_device(self):
        import torch  # here, with the first generation, not at start-up (seconds saved)

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def combination(self, ref: str):
        """The registered combination ``ref`` loaded as serving loads it: its files downloaded,
        then :meth:`CtrLoRAPyfunc.load_context` (parts fetched and hash-checked, recipe read)."""
        from pipelines.registry.models import download_version
        from pipelines.registry.pyfunc import CtrLoRAPyfunc

        key = ("combination", ref)
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        device = self._torch_device()
        dst = self.catalogue.cache / ref[len("models:/"):].replace("/", "-v")
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        _, _, _, paths = download_version(ref, dst)
        model = CtrLoRAPyfunc()
        model.load_context(SimpleNamespace(artifacts={k: str(v) for k, v in paths.items()}))
        model.pipe = model.pipe.to(device)
        self._pipes[key] = model
        while len(self._pipes) > MAX_PIPELINES:
            self._pipes.popitem(last=False)
        return model

    def run_combination(self, req: ComboRequest, scans: PromotionScans, job: Job) -> dict:
        """One request table, as a client of the served model sends it (one row per condition of
        each image; image ``i`` at seed ``seed + i``), drawn by the pyfunc's ``predict``; every
        scheduler step advances the job's progress."""
        import pandas as pd
        from PIL import Image

        from ctrlora.evaluation.single_scan import scan_truth, score_images
        from pipelines.registry.pyfunc import CONDITION_COLUMN, IMAGE_COLUMN, NAME_COLUMN, REQUEST_COLUMN

        job.message = f"loading {req.label}"
        model = self.combination(req.ref)
        raw = {c: scans.map_file(req.scan, c).read_bytes() for c in req.conditions}
        rows = [{REQUEST_COLUMN: i, NAME_COLUMN: c, CONDITION_COLUMN: raw[c], "weight": req.weights[c],
                 "seed": req.seed + i, "prompt": req.prompt, **req.sampling}
                for i in range(req.num_images) for c in req.conditions]
        steps = int(req.sampling.get("steps", model.recipe["steps"]))
        job.total = steps * req.num_images
        pipe = model.pipe
        make = pipe.make_scheduler

        def counted_scheduler(name):
            return _count_steps(make(name), job)

        job.message = f"sampling {req.label}"
        pipe.__dict__["make_scheduler"] = counted_scheduler   # this job only; removed below
        try:
            out = model.predict(None, pd.DataFrame(rows))
        except Exception as exc:
            from mlflow.exceptions import MlflowException

            if isinstance(exc, MlflowException):   # the model refused the request: say why
                raise StudioError(f"{req.label}: {exc.message}") from exc
            raise
        finally:
            pipe.__dict__.pop("make_scheduler", None)
        images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.uint8) for b in out[IMAGE_COLUMN]]
        size = images[0].shape[0]
        photo, truths = scan_truth(scans.prepared, req.scan, list(req.conditions), scans.scan_sources)
        scores = score_images(np.stack(images), resize_u8(photo, size),
                              {c: t for c, t in truths.items() if t.shape[0] == size},
                              self.detectors(list(req.conditions)))
        recipe = {**{k: model.recipe[k] for k in ("scheduler", "steps", "guidance_scale")}, **req.sampling}
        return {"maps": [{"condition": c, "weight": req.weights[c],
                          "image": png_data_url(scans.image(req.scan, c))} for c in req.conditions],
                "truth": png_data_url(resize_u8(scans.image(req.scan, "photo"), size)),
                "scan": req.scan, "prompt": req.prompt, "compare": None,
                "combination": {"ref": req.ref, "label": req.label, "weights": req.weights,
                                "sampling": recipe, "from_recipe": not req.sampling},
                "runs": [{"ref": req.ref, "adapters": {c: c for c in req.conditions},
                          "images": [{"image": png_data_url(im), "seed": req.seed + i, "scores": s}
                                     for i, (im, s) in enumerate(zip(images, scores))],
                          "mean_scores": {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
                          if scores and scores[0] else {}}]}

    def detectors(self, conditions: list[str]) -> dict[str, Any]:
        from ctrlora.evaluation.detectors import load_detector
        from ctrlora.evaluation.fidelity import DETECTED_CONDITIONS

        for c in conditions:
            d = self.detectors_dir / c if self.detectors_dir else None
            if c in DETECTED_CONDITIONS and c not in self._detectors and d is not None and d.is_dir():
                self._detectors[c] = load_detector(d)
        return {c: self._detectors[c] for c in conditions if c in self._detectors}

    @staticmethod
    def native_size(pipe) -> int:
        return int(pipe.unet.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def sample(self, pipe, req: Request, job: Job) -> np.ndarray:
        """uint8 ``N×S×S×3`` images; every scheduler step advances the job's progress."""
        size = self.native_size(pipe)
        sched = _count_steps(pipe.make_scheduler(req.sampler), job)
        conds = {c.condition: (map_at(c, size), c.weight) for c in req.conds}
        out = pipe(req.prompt, conds, num_inference_steps=req.steps, guidance_scale=req.guidance,
                   negative_prompt=req.negative_prompt or None, scheduler=sched,
                   control_strength=req.strength, seed=[req.seed + i for i in range(req.num_images)],
                   num_images_per_prompt=req.num_images, height=size, width=size, output_type="np",
                   progress=False)
        return np.clip(np.round(np.asarray(out.images) * 255.0), 0, 255).astype(np.uint8)

    def run(self, req: Request, scans: PromotionScans, job: Job) -> dict:
        from ctrlora.evaluation.single_scan import scan_truth, score_images

        versions = [("", {c.condition: c.ref for c in req.conds})]
        if req.compare:
            cond, a, b = req.compare
            versions = [(ref, {**versions[0][1], cond: ref}) for ref in (a, b)]
        job.total = req.steps * len(versions)
        truth = None
        if req.scan:
            scored = [c.condition for c in req.conds if c.from_scan]
            photo, truths = scan_truth(scans.prepared, req.scan, scored, scans.scan_sources)
            truth = (photo, truths, self.detectors(scored))
        runs, size = [], None
        for label, adapters in versions:
            job.message = f"loading {label or 'models'}"
            pipe = self.pipeline(adapters)
            size = self.native_size(pipe)
            job.message = f"sampling {label}".strip()
            images = self.sample(pipe, req, job)
            scores = [{} for _ in images]
            if truth is not None:
                photo, truths, dets = truth
                scores = score_images(images, resize_u8(photo, size),
                                      {c: t for c, t in truths.items() if t.shape[0] == size}, dets)
            runs.append({"ref": label, "adapters": adapters,
                         "images": [{"image": png_data_url(im), "seed": req.seed + i, "scores": s}
                                    for i, (im, s) in enumerate(zip(images, scores))],
                         "mean_scores": {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
                         if scores and scores[0] else {}})
        return {"maps": [{"condition": c.condition, "weight": c.weight,
                          "image": png_data_url(map_at(c, size))} for c in req.conds],
                "truth": png_data_url(resize_u8(scans.image(req.scan, "photo"), size)) if req.scan else None,
                "scan": req.scan, "prompt": req.prompt, "runs": runs,
                "compare": list(req.compare) if req.compare else None}


# ----------------------------------------------------------------------------- the app

class Studio:
    """State behind the web app: catalogue, uploads, promotion-split scans, jobs, engine, gate."""

    def __init__(self, catalogue: Catalogue, scans: PromotionScans, engine: Engine, repo: Path):
        self.catalogue, self.scans, self.engine, self.repo = catalogue, scans, engine, repo
        self.jobs = Jobs()
        self.uploads: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()

    # -- uploads
    def upload(self, body: dict) -> dict:
        filename = str(body.get("filename") or "upload")
        img = decode_upload(body.get("data"), filename)
        if max(img.shape[:2]) > KEEP_SIDE:
            img = resize_u8(img, KEEP_SIDE)
        token = uuid.uuid4().hex[:16]
        self.uploads[token] = (filename, img)
        while len(self.uploads) > MAX_UPLOADS:
            self.uploads.popitem(last=False)
        return {"token": token, "filename": filename, "width": img.shape[1], "height": img.shape[0],
                "preview": png_data_url(resize_u8(img, 128))}

    def _upload(self, token: Any, what: str) -> tuple[str, np.ndarray]:
        if not isinstance(token, str) or token not in self.uploads:
            raise StudioError(f"{what}: no image uploaded (or the upload expired; upload it again)")
        return self.uploads[token]

    def derive(self, body: dict) -> dict:
        from ctrlora.data.conditions import encode_u8
        from ctrlora.data.scan import Scan

        cond = body.get("condition")
        if cond not in DERIVED:
            raise StudioError(f"condition {cond!r} cannot be derived from a photograph "
                              f"(derived conditions: {', '.join(DERIVED)})")
        filename, photo = self._upload(body.get("photo"), "photo")
        return png_data_url(encode_u8(cond, Scan(scan_id=filename, photo=resize_u8(photo, 128))))

    # -- state
    def state(self) -> dict:
        adapters = [a.public() for a in self.catalogue.adapters()]
        import mlflow

        combinations = self.catalogue.combinations()
        return {"adapters": adapters, "combinations": combinations, "registry_error": self.catalogue.registry_error,
                "tracking_uri": mlflow.get_tracking_uri(),
                "conditions": sorted({a["condition"] for a in adapters}),
                "derived": list(DERIVED), "samplers": list(SAMPLERS), "limits": LIMITS,
                "scans": [{"id": s, "caption": self.scans.captions[s],
                           "conditions": sorted(self.scans.conditions[s])} for s in self.scans.ids()],
                "vocabulary": self.scans.vocabulary(), "gate": self.gate_config(),
                "default_weights": self.default_weights(), "default_sampling": self.default_sampling()}

    def _params_table(self, section: str, key: str) -> dict:
        """``params.yaml``'s ``section.key`` mapping ({} where either is missing or not a mapping)."""
        block = load_params(self.repo).get(section) or {}
        table = block.get(key) if isinstance(block, dict) else None
        return dict(table) if isinstance(table, dict) else {}

    def default_weights(self) -> dict[str, float]:
        """Each condition's residual weight as the evaluation uses it (``evaluate.condition_weights``,
        chosen on the validation split); conditions missing there start at 1."""
        weights = self._params_table("evaluate", "condition_weights")
        return {str(c): float(w) for c, w in weights.items() if isinstance(w, (int, float))}

    def default_sampling(self) -> dict[str, Any]:
        """The page's starting sampler, steps and guidance: the evaluation's (``evaluate.sampling``,
        ``evaluate.gate_guidance``), which every registered version records as its recipe."""
        block = load_params(self.repo).get("evaluate") or {}
        sampling = block.get("sampling") if isinstance(block, dict) else None
        out: dict[str, Any] = {}
        if isinstance(sampling, dict):
            if sampling.get("scheduler") in SAMPLERS:
                out["sampler"] = sampling["scheduler"]
            if isinstance(sampling.get("steps"), int):
                out["steps"] = sampling["steps"]
        if isinstance(block, dict) and isinstance(block.get("gate_guidance"), (int, float)):
            out["guidance"] = float(block["gate_guidance"])
        return out

    def gate_config(self) -> dict:
        return self._params_table("register", "gate")

    # -- requests
    def parse(self, body: dict) -> Request:
        if not isinstance(body, dict):
            raise StudioError("the request must be a JSON object")
        items = body.get("conditions")
        if not isinstance(items, list) or not items:
            raise StudioError("pick at least one condition")
        offered = {a.ref: a for a in self.catalogue.adapters()}
        by_cond: dict[str, list[str]] = {}
        for a in offered.values():
            by_cond.setdefault(a.condition, []).append(a.ref)
        scan = body.get("scan") or None
        if scan is not None:
            scan = self.scans.require(scan)
        conds, seen, weights = [], set(), self.default_weights()
        for item in items:
            c = item.get("condition") if isinstance(item, dict) else None
            if c not in by_cond:
                raise StudioError(f"a map was given for condition {c!r}, which has no adapter "
                                  f"(conditions with adapters: {', '.join(sorted(by_cond)) or 'none'})")
            if c in seen:
                raise StudioError(f"condition {c!r} given twice")
            seen.add(c)
            ref = item.get("version") or by_cond[c][0]
            if ref not in offered or offered[ref].condition != c:
                raise StudioError(f"{c}: version {ref!r} is not an adapter of this condition")
            w = _number(item, "weight", weights.get(c, 1.0))
            source = item.get("source", "upload")
            if source == "scan":
                if scan is None:
                    raise StudioError(f"{c}: pick a scan to take its map from")
                img, from_scan = self.scans.image(scan, c), True
            elif source == "derive":
                if c not in DERIVED:
                    raise StudioError(f"{c} is not derived from a photograph; upload its map "
                                      f"(derived conditions: {', '.join(DERIVED)})")
                img, from_scan = self._upload(item.get("map"), f"{c} photo")[1], False
            elif source == "upload":
                img, from_scan = self._upload(item.get("map"), f"{c} map")[1], False
            else:
                raise StudioError(f"{c}: unknown map source {source!r} (upload, scan or derive)")
            conds.append(CondSpec(c, ref, w, img, from_scan, derive=source == "derive"))
        sampler = body.get("sampler", "ddim")
        if sampler not in SAMPLERS:
            raise StudioError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
        compare = None
        if body.get("compare"):
            cmp_ = body["compare"]
            c, a, b = cmp_.get("condition"), cmp_.get("a"), cmp_.get("b")
            if c not in seen:
                raise StudioError(f"compare: condition {c!r} is not among the picked conditions")
            for ref in (a, b):
                if ref not in offered or offered[ref].condition != c:
                    raise StudioError(f"compare: {ref!r} is not a version of {c}")
            if a == b:
                raise StudioError("compare: pick two different versions")
            compare = (c, a, b)
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str) or len(prompt) > 500:
            raise StudioError("prompt: text of at most 500 characters")
        return Request(conds, scan, prompt, str(body.get("negative_prompt") or ""),
                       int(_number(body, "steps", 20, int)), sampler, _number(body, "guidance", 1.0),
                       int(_number(body, "seed", 0, int)), int(_number(body, "num_images", 2, int)),
                       _number(body, "strength", 1.0), compare)

    def parse_combination(self, body: dict) -> ComboRequest:
        """A generation from a registered combination: ``combination`` (its ref), ``scan`` (each
        condition's map), ``weights`` ({condition: weight}; unset: the recipe's), ``recipe``
        (true: sample with the recipe; false: ``steps``, ``sampler``, ``guidance`` of the body),
        ``prompt``, ``seed``, ``num_images``."""
        combo = self.catalogue.find_combination(body.get("combination"))
        conditions = list(combo["conditions"])
        scan = body.get("scan") or None
        if scan is None:
            raise StudioError(f"{combo['label']}: pick a validation scan; each of its conditions "
                              f"({', '.join(conditions)}) takes its map from that scan")
        scan = self.scans.require(scan)
        missing = [c for c in conditions if c not in self.scans.conditions[scan]]
        if missing:
            raise StudioError(f"scan {scan} has no {', '.join(map(repr, missing))} map "
                              f"(prepared conditions of this scan: {', '.join(sorted(self.scans.conditions[scan]))})")
        given = body.get("weights") or {}
        if not isinstance(given, dict):
            raise StudioError("weights: expected {condition: weight}")
        unknown = sorted(set(map(str, given)) - set(conditions))
        if unknown:
            raise StudioError(f"weights: {', '.join(map(repr, unknown))} is not a condition of {combo['model']} "
                              f"(it has {', '.join(conditions)})")
        weights = {}
        for c in conditions:
            try:
                weights[c] = _number({"weight": given[c]} if c in given else {}, "weight", combo["weights"].get(c, 1.0))
            except StudioError as exc:
                raise StudioError(f"{c}: {exc}") from None
        sampling: dict[str, Any] = {}
        if body.get("recipe", True) is not True:
            sampler = body.get("sampler", "ddim")
            if sampler not in SAMPLERS:
                raise StudioError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
            sampling = {"steps": int(_number(body, "steps", 20, int)), "scheduler": sampler,
                        "guidance_scale": _number(body, "guidance", 1.0)}
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str) or len(prompt) > 500:
            raise StudioError("prompt: text of at most 500 characters")
        return ComboRequest(combo["ref"], combo["label"], conditions, weights, scan, prompt,
                            int(_number(body, "seed", 0, int)), int(_number(body, "num_images", 1, int)), sampling)

    def generate(self, body: dict) -> dict:
        if isinstance(body, dict) and body.get("combination") is not None:
            creq = self.parse_combination(body)
            job = self.jobs.submit("combination", lambda j: self.engine.run_combination(creq, self.scans, j))
            return job.public()
        req = self.parse(body)
        job = self.jobs.submit("compare" if req.compare else "generate",
                               lambda j: self.engine.run(req, self.scans, j))
        return job.public()

    def adapter_details(self, ref: Any) -> dict:
        """The adapter's own record (``adapter_config.json``: rank, parameters, base hash,
        training stage and steps) and file size; a registry version is downloaded for it."""
        from ctrlora.models.adapters import ADAPTER_WEIGHTS, read_adapter_config

        if not isinstance(ref, str):
            raise StudioError("adapter: no reference given")
        self.catalogue.find(ref)
        try:
            parts = self.catalogue.parts(ref)
        except Exception as exc:  # download / store errors, as one line
            raise StudioError(f"{ref}: cannot be fetched ({exc})") from exc
        cfg = read_adapter_config(parts.adapter)
        keep = ("condition", "rank", "alpha", "num_params", "base_hash", "origin", "stage", "steps", "dtype")
        out = {k: cfg[k] for k in keep if k in cfg}
        out["target_modules"] = len(cfg.get("target_modules") or [])
        out["file_bytes"] = (parts.adapter / ADAPTER_WEIGHTS).stat().st_size
        return out

    def gate_report(self, condition: Any, version: Any) -> dict:
        """What the page shows before a promotion: the version's paired comparison with the
        champion on the frozen benchmark, as registration (or an earlier promotion) recorded it,
        the residual weight a comparison samples at (the version's recipe weight), and whether
        promoting would reuse the recorded one (same champion, benchmark version and weight) or run
        it now; a forced promotion's reason."""
        from pipelines.registry.frozen_benchmark import current_version
        from pipelines.registry.gate import comparison_weight, recorded_weight

        rows = [a for a in self.catalogue.adapters() if a.condition == condition and a.version is not None]
        row = next((a for a in rows if a.version == str(version)), None)
        if row is None:
            raise StudioError(f"ctrlora-{condition} has no registered version {version!r}")
        champ = next((a for a in rows if "champion" in a.aliases), None)
        tags = row.info.get("tags", {})
        try:
            weight = comparison_weight(tags, f"ctrlora-{condition} v{row.version}")
        except ValueError as exc:
            raise StudioError(str(exc)) from exc
        paired = None
        if "gate_low" in tags and "gate_champion_version" in tags:
            paired = {"champion_version": tags["gate_champion_version"],
                      "benchmark_version": tags.get("benchmark_version"), "metric": tags.get("gate_metric"),
                      "delta": float(tags["gate_delta"]), "low": float(tags["gate_low"]),
                      "high": float(tags["gate_high"]), "n_scans": tags.get("gate_n_scans"),
                      "weight": recorded_weight(tags)}
        current = champ.version if champ else None
        bench_now = current_version(self.repo)
        reuse = bool(paired and current and paired["champion_version"] == current
                     and bench_now is not None and paired["benchmark_version"] == str(bench_now)
                     and paired["weight"] == weight)
        return {"condition": condition, "version": row.version, "aliases": row.aliases,
                "gate": row.info.get("gate"), "gate_reason": row.info.get("gate_reason"),
                "gate_config": self.gate_config(), "champion": current, "paired": paired, "weight": weight,
                "benchmark_version": bench_now,
                "compare_now": bool(current) and not reuse and current != row.version,
                "forced_reason": tags.get("forced_reason")}

    def promote(self, body: dict) -> dict:
        """Promotion on evidence (:func:`pipelines.registry.registration.promote`): the paired
        comparison with the champion on the frozen benchmark, run now when the version does not
        carry one for this champion; ``force`` with a ``reason`` overrides it, recorded."""
        from pipelines.registry import models as registry
        from pipelines.registry.frozen_benchmark import gate_for
        from pipelines.registry.registration import promote

        cond, version = body.get("condition"), body.get("version")
        if body.get("confirm") is not True:
            raise StudioError("promotion needs a confirmation")
        report = self.gate_report(cond, version)
        gate = self.gate_config() or None
        try:
            if body.get("force"):
                res = promote(str(cond), str(version), gate=gate, force=True, reason=str(body.get("reason") or ""))
            else:
                judge = gate_for(self.repo, gate or {}, log=lambda m: None, freeze_missing=False)
                try:
                    res = promote(str(cond), str(version), gate=gate, judge=judge)
                finally:
                    if judge is not None:
                        judge.close()
        except registry.RegistryError as exc:
            raise StudioError(str(exc)) from exc
        return {"promoted": res.promoted, "reason": res.reason, "previous": res.previous,
                "version": res.version, "condition": cond, "report": report}


def make_app(studio: Studio):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from pipelines.studio.page import PAGE

    app = FastAPI(title="CtrLoRA dental studio", docs_url=None, redoc_url=None, openapi_url=None)

    def answer(fn: Callable[[], Any]):
        try:
            return JSONResponse(fn())
        except StudioError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    async def body_of(request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise StudioError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise StudioError("the request must be a JSON object")
        return body

    def post(path: str, method: Callable[[dict], Any]):
        async def endpoint(request):  # a plain Starlette route: the request as it came
            try:
                body = await body_of(request)
            except StudioError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(answer, lambda: method(body))
        app.add_route(path, endpoint, methods=["POST"])

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(PAGE)

    @app.get("/api/state")
    def state():
        return answer(studio.state)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        return answer(lambda: studio.jobs.get(job_id).public())

    @app.get("/api/adapter")
    def adapter(ref: str = ""):
        return answer(lambda: studio.adapter_details(ref))

    @app.get("/api/gate")
    def gate(condition: str = "", version: str = ""):
        return answer(lambda: studio.gate_report(condition, version))

    @app.get("/api/scans/{scan_id}/{what}.png")
    def scan_image(scan_id: str, what: str):
        try:
            img = studio.scans.image(scan_id, what)
        except StudioError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    post("/api/upload", studio.upload)
    post("/api/derive", lambda b: {"image": studio.derive(b)})
    post("/api/generate", studio.generate)
    post("/api/promote", studio.promote)
    return app


# ----------------------------------------------------------------------------- command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter folder to offer beside the registry's versions; repeatable")
    p.add_argument("--backbone", type=Path, default=REPO_ROOT / BACKBONE_DIR,
                   help="backbone of the --adapter folders (default: the repo's)")
    p.add_argument("--base", type=Path, default=REPO_ROOT / BASE_DIR,
                   help="base ControlNet of the --adapter folders (default: the repo's)")
    p.add_argument("--no-registry", action="store_true", help="offer only --adapter folders")
    p.add_argument("--prepared", type=Path, default=REPO_ROOT / PATHS["prepared"],
                   help="prepared data whose validation split offers scans (default: the repo's)")
    p.add_argument("--detectors", type=Path, default=REPO_ROOT / PATHS["detectors"],
                   help="re-detectors that score fidelity (default: the repo's)")
    p.add_argument("--repo", type=Path, default=REPO_ROOT,
                   help="project whose params.yaml 'register.gate' promotions apply")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _folders(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, d = item.partition("=")
        if not sep or not name or not d:
            raise StudioError(f"--adapter {item!r}: expected NAME=DIR")
        if not Path(d).is_dir():
            raise StudioError(f"--adapter {name}: directory {d} does not exist")
        out[name] = Path(d).resolve()
    return out


def build(args, cache: Path) -> Studio:
    folders = _folders(args.adapter)
    from pipelines.stages.common import resolve_backbone

    # the repo's models/backbone is the record of the backbone the graph read: follow it
    catalogue = Catalogue(folders, resolve_backbone(args.backbone), args.base, cache, use_registry=not args.no_registry)
    if not folders and not args.no_registry and not catalogue.adapters():
        catalogue.folders = repo_folders(args.repo)   # empty registry: the repo's own folders
    sources = [args.repo / PATHS["rendered"], args.repo / PATHS["scans"]]
    scans = PromotionScans(args.prepared, sources)
    engine = Engine(catalogue, args.device, args.detectors if args.detectors.is_dir() else None,
                    threads=args.threads)
    return Studio(catalogue, scans, engine, args.repo)


def run(args) -> int:
    import uvicorn

    cache = Path(tempfile.mkdtemp(prefix="ctrlora-studio-"))
    try:
        try:
            studio = build(args, cache)
        except StudioError as exc:
            print(f"ctrlora-ops studio: error: {exc}", file=sys.stderr)
            return 2
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            print(f"ctrlora-ops studio: error: cannot serve on {args.host}:{args.port} ({exc})", file=sys.stderr)
            return 2
        sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(uvicorn.Config(make_app(studio), log_level="warning"))
        print(f"ctrlora studio: serving on http://{host}:{port}/", flush=True)
        started = time.monotonic()
        server.run(sockets=[sock])
        print(f"ctrlora studio: stopped after {time.monotonic() - started:.0f} s", flush=True)
        return 0
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctrlora-ops studio", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import pipelines  # noqa: F401  (tool defaults: MLflow store, telemetry off)
    sys.exit(main())
