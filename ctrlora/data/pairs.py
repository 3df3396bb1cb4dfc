"""Reader of the prepared pairs (``data/prepared/conditions/<c>/pairs.jsonl``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ctrlora.data.files import read_png

SPLITS = ("train", "validation", "test")


def read_pairs(prepared_root: Path, condition: str, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(prepared_root) / "conditions" / condition / "pairs.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pairs for condition {condition!r} (run the prepare stage)")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


class PairDataset(Dataset):
    """(photo, condition image, caption) pairs of one condition and split.

    Items: ``{"photo": float32 3×H×W in [-1, 1], "condition": float32 3×H×W in [0, 1],
    "caption": str, "scan_id": str}``. ``preload=True`` decodes every image once up front (the
    default data set is small), otherwise images are read on access.
    """

    def __init__(self, prepared_root: Path | str, condition: str, split: str = "train", preload: bool = False):
        self.root = Path(prepared_root)
        self.condition = condition
        self.split = split
        self.rows = read_pairs(self.root, condition, split)
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if preload:
            self._cache = [self._load(r) for r in self.rows]

    def _load(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return read_png(self.root / row["photo"], "RGB"), read_png(self.root / row["condition"], "RGB")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        photo, cond = self._cache[index] if self._cache is not None else self._load(row)
        return {
            "photo": torch.from_numpy(photo.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0),
            "condition": torch.from_numpy(cond.astype(np.float32).transpose(2, 0, 1) / 255.0),
            "caption": row["caption"],
            "scan_id": row["scan_id"],
        }
