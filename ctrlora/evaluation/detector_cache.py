"""Detectors phase of the evaluation: a trained re-detector per detected condition, trained once
on the training scans and cached on disk under a key of its configuration and training scans."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from .detectors import load_detector, save_detector, train_detector
from .fidelity import DETECTED_CONDITIONS, default_detector_config
from .loading import EvalData, detector_targets

__all__ = ["get_detectors", "load_detectors"]

KEY_NAME = "train_key.json"


def get_detectors(conditions: Sequence[str], train: EvalData, cache_dir: str | Path | None,
                  overrides: Mapping[str, Any] | None = None, progress: bool = True,
                  train_missing: bool = True) -> dict[str, Any]:
    """A trained re-detector per detected condition (segmentation, lighting, depth, normal) among
    ``conditions``. With ``cache_dir``, a detector is loaded from ``<cache_dir>/<c>`` when its
    configuration and training scans match, else trained and saved there — or, with
    ``train_missing=False`` (a reader of detectors another step trained), a clear error."""
    ids_hash = hashlib.sha256("\n".join(train.scan_ids).encode()).hexdigest()[:16]
    out = {}
    for c in conditions:
        if c not in DETECTED_CONDITIONS:
            continue
        cfg = default_detector_config(c, **dict(overrides or {}))
        key = {"config": asdict(cfg), "train_scans": len(train), "train_ids_sha256": ids_hash}
        d = Path(cache_dir) / c if cache_dir else None
        if d is not None and (d / KEY_NAME).is_file() and json.loads((d / KEY_NAME).read_text()) == key:
            out[c] = load_detector(d)
            continue
        if not train_missing:
            raise FileNotFoundError(f"{d}: no re-detector for {c!r} trained with this configuration and these "
                                    "training scans (train them first: the foundation graph's `detectors` stage, `make foundation`)")
        model = train_detector(cfg, train.photos, detector_targets(c, train), progress=progress)
        if d is not None:
            save_detector(model, d)
            (d / KEY_NAME).write_text(json.dumps(key, indent=1, sort_keys=True))
        out[c] = model
    return out


def load_detectors(conditions: Sequence[str], directory: str | Path) -> dict[str, Any]:
    """The re-detectors another step trained (``<directory>/<c>``), one per detected condition among
    ``conditions``, whatever scans they were trained on; a clear error naming the missing ones."""
    d = Path(directory)
    wanted = [c for c in conditions if c in DETECTED_CONDITIONS]
    missing = [c for c in wanted if not (d / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{d}: no re-detector for {missing} (have: "
                                f"{sorted(p.name for p in d.glob('*') if p.is_dir()) if d.is_dir() else 'none'})")
    return {c: load_detector(d / c) for c in wanted}
