"""The segmentation label table.

Label ids are the 8-bit values stored in ``segmentation.png``. Teeth are labelled by *type* and
*jaw* (not by individual tooth): the left and right canine of the upper jaw share one label.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

JAWS = ("upper", "lower")
TOOTH_TYPES = ("incisor", "canine", "premolar", "molar")


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    color: tuple[int, int, int]  # display colour, also the segmentation condition's encoding


def _tooth_labels() -> list[Label]:
    colors = {
        ("upper", "incisor"): (255, 255, 110),
        ("upper", "canine"): (255, 160, 40),
        ("upper", "premolar"): (90, 200, 255),
        ("upper", "molar"): (60, 90, 255),
        ("lower", "incisor"): (170, 255, 120),
        ("lower", "canine"): (40, 180, 60),
        ("lower", "premolar"): (230, 110, 255),
        ("lower", "molar"): (140, 40, 200),
    }
    out = []
    next_id = 2
    for jaw in JAWS:
        for kind in TOOTH_TYPES:
            out.append(Label(next_id, f"{jaw}_{kind}", colors[(jaw, kind)]))
            next_id += 1
    return out


LABELS: dict[int, Label] = {
    lab.id: lab
    for lab in [Label(0, "background", (0, 0, 0)), Label(1, "gingiva", (200, 40, 60)), *_tooth_labels()]
}
LABEL_IDS: dict[str, int] = {lab.name: lab.id for lab in LABELS.values()}
BACKGROUND = 0
GINGIVA = 1
TOOTH_LABEL_IDS: frozenset[int] = frozenset(i for i in LABELS if i >= 2)


def tooth_label(jaw: str, kind: str) -> int:
    """Label id of a tooth type in a jaw, e.g. ``tooth_label("upper", "canine") == 3``."""
    try:
        return LABEL_IDS[f"{jaw}_{kind}"]
    except KeyError:
        raise ValueError(f"no label for jaw={jaw!r} tooth type={kind!r}") from None


def color_lut() -> np.ndarray:
    """256×3 uint8 lookup table: label id → display colour (unknown ids map to magenta)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = (255, 0, 255)
    for lab in LABELS.values():
        lut[lab.id] = lab.color
    return lut
