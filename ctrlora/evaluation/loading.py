"""Loading phase of the evaluation: the scans of one split and the models under test.

* :func:`load_split` reads the prepared pairs of a split (photos, condition images, captions) and
  the raw segmentation label maps of those scans.
* :func:`load_models` loads the backbone and the base ControlNet with every adapter (each must
  record this base's hash), and counts the ControlNet's own parameters, against which an
  adapter's size is measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ctrlora.data.files import read_png

from .fidelity import DETECTED_CONDITIONS
from .grids import colorize_labels

__all__ = ["EvalData", "EvalModels", "load_split", "load_models", "fidelity_truth", "detector_targets",
           "condition_cell"]


@dataclass
class EvalData:
    """Scans of one split. ``photos``/``conditions[c]``: uint8 ``N×H×W×3`` (the prepared images);
    ``labels``: int64 ``N×H×W`` raw segmentation label maps (when segmentation is asked for)."""

    scan_ids: list[str]
    captions: list[str]
    photos: np.ndarray
    conditions: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scan_ids)

    def subset(self, n: int) -> "EvalData":
        """The first ``n`` scans (the same scans, in the same order, as the full split's first n)."""
        return EvalData(self.scan_ids[:n], self.captions[:n], self.photos[:n],
                        {c: v[:n] for c, v in self.conditions.items()},
                        None if self.labels is None else self.labels[:n])


def _label_map(sid: str, sources: Sequence[Path]) -> np.ndarray:
    found = [s / sid / "segmentation.png" for s in sources if (s / sid / "segmentation.png").is_file()]
    if not found:
        raise FileNotFoundError(f"scan {sid!r}: no raw segmentation.png under any of {[str(s) for s in sources]} "
                                "(segmentation fidelity compares label maps; pass the scan folders)")
    return read_png(found[0], "L").astype(np.int64)


def load_split(prepared_root: str | Path, split: str, conditions: Sequence[str],
               scan_sources: Sequence[str | Path] = (), max_scans: int | None = None,
               progress: bool = True) -> EvalData:
    """The scans of ``split`` that have every one of ``conditions`` (scan-id order, first
    ``max_scans``). Segmentation also needs the raw label maps: each scan's folder is looked up in
    ``scan_sources`` (the folders ``prepare`` read, e.g. ``data/rendered``, ``data/scans``)."""
    from ctrlora.data.pairs import read_pairs

    root = Path(prepared_root)
    if not conditions:
        raise ValueError("load_split: no conditions")
    rows = {c: {r["scan_id"]: r for r in read_pairs(root, c, split)} for c in conditions}
    ids = sorted(set.intersection(*(set(r) for r in rows.values())))
    if max_scans:
        ids = ids[: int(max_scans)]
    if not ids:
        raise ValueError(f"{root}: no {split} scans with all of {list(conditions)}")
    first = rows[conditions[0]]
    photos: list[np.ndarray] = []
    conds: dict[str, list[np.ndarray]] = {c: [] for c in conditions}
    labels: list[np.ndarray] | None = [] if "segmentation" in conditions else None
    sources = [Path(s) for s in scan_sources]
    for sid in tqdm(ids, desc=f"load {split}", disable=not progress, leave=False):
        photos.append(read_png(root / first[sid]["photo"], "RGB"))
        for c in conditions:
            conds[c].append(read_png(root / rows[c][sid]["condition"], "RGB"))
        if labels is not None:
            labels.append(_label_map(sid, sources))
    return EvalData(ids, [first[s]["caption"] for s in ids], np.stack(photos),
                    {c: np.stack(v) for c, v in conds.items()}, None if labels is None else np.stack(labels))


def fidelity_truth(condition: str, data: EvalData) -> np.ndarray:
    """The data a re-detection of ``condition`` is compared with: label maps for segmentation,
    else the condition image."""
    if condition == "segmentation":
        if data.labels is None:
            raise ValueError("segmentation fidelity needs the raw label maps (load_split with scan_sources)")
        return data.labels
    return data.conditions[condition]


def detector_targets(condition: str, data: EvalData) -> np.ndarray:
    """Training targets of ``condition``'s re-detector: label maps, or maps in [0, 1]."""
    if condition == "segmentation":
        return fidelity_truth(condition, data)
    img = data.conditions[condition].astype(np.float32) / 255.0
    return img[..., 0] if DETECTED_CONDITIONS[condition][1] == 1 else img


def condition_cell(condition: str, data: EvalData, i: int) -> np.ndarray:
    """What a grid shows for scan ``i``'s ``condition``: the label map coloured with the grid
    palette for segmentation, else the condition image."""
    if condition == "segmentation" and data.labels is not None:
        return colorize_labels(data.labels[i])
    return data.conditions[condition][i]


@dataclass
class EvalModels:
    """What is evaluated: the backbone and one ControlNet holding an adapter per condition (base
    conditions' from ``models/base/adapters``, new ones' from ``models/adapters``).

    ``adapter_params``: each adapter's parameter count (its ``num_params``);
    ``controlnet_params``: parameters of the base ControlNet itself (without adapters) — what a
    full ControlNet per condition would train."""

    backbone: Any
    controlnet: Any
    adapter_params: dict[str, int] = field(default_factory=dict)
    controlnet_params: int = 0


def load_models(backbone_dir: str | Path, base_dir: str | Path, adapter_dirs: Mapping[str, str | Path]) -> EvalModels:
    """Load the backbone and the base with every adapter (``{condition: adapter_dir}``; each must
    record this base's hash); no adapter is left active."""
    from ctrlora.models import adapters as adapters_lib
    from ctrlora.models.backbone import load_backbone
    from ctrlora.models.controlnet import CtrLoRAControlNet

    bb = load_backbone(backbone_dir)
    cn = CtrLoRAControlNet.from_pretrained(base_dir)
    n_controlnet = sum(p.numel() for p in cn.parameters())  # counted before any adapter is attached
    want = adapters_lib.base_hash(cn)
    sizes = {}
    for c, d in adapter_dirs.items():
        adapters_lib.load_adapter(cn, d, name=c, expected_base_hash=want)
        sizes[c] = int(adapters_lib.read_adapter_config(d)["num_params"])
    adapters_lib.set_adapter(cn, None)
    return EvalModels(bb, cn.eval(), adapter_params=sizes, controlnet_params=int(n_controlnet))
