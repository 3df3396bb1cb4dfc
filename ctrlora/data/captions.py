"""Captions built from a scan's metadata, over a small closed vocabulary.

A caption reads like ``dental photo of both jaws, ivory teeth, light from top left, missing upper
canine, lower premolar``. Words are separated by spaces and commas; every word is in
:data:`CAPTION_VOCABULARY`, so a word-level tokenizer can be built from that list alone.
"""
from __future__ import annotations

import math
import re
from typing import Any

from ctrlora.data.labels import JAWS, TOOTH_TYPES

SHADE_WORDS = ("white", "ivory", "yellow", "grey")
DIRECTION_WORDS = ("front", "top", "bottom", "left", "right")
CAPTION_VOCABULARY: tuple[str, ...] = (
    "dental", "photo", "of", "both", "jaws", "jaw", "teeth", "light", "from", "missing", "no",
    *JAWS, *TOOTH_TYPES, *SHADE_WORDS, *DIRECTION_WORDS,
)

_TOOTH_NAME = re.compile(r"^(upper|lower)_(left|right)_(incisor|canine|premolar|molar)\d*$")


def light_words(direction: list[float] | tuple[float, float, float]) -> str:
    """Where the light comes from, seen from the camera (x right, y up, z toward camera)."""
    x, y, z = (float(v) for v in direction)
    lateral = math.hypot(x, y)
    if lateral < math.sin(math.radians(20.0)) * math.sqrt(x * x + y * y + z * z):
        return "front"
    angle = math.degrees(math.atan2(y, x)) % 360.0
    sector = int(((angle + 22.5) % 360.0) // 45.0)
    return ("right", "top right", "top", "top left", "left", "bottom left", "bottom", "bottom right")[sector]


def _tooth_types(names: list[str]) -> list[str]:
    """Distinct 'jaw type' phrases, in a fixed order (upper before lower, front to back)."""
    seen = set()
    for name in names:
        m = _TOOTH_NAME.match(name)
        if not m:
            raise ValueError(f"unknown tooth name {name!r} in meta")
        seen.add((m.group(1), m.group(3)))
    return [f"{jaw} {kind}" for jaw in JAWS for kind in TOOTH_TYPES if (jaw, kind) in seen]


def caption_from_meta(meta: dict[str, Any]) -> str:
    jaw = meta.get("jaw", "both")
    if jaw not in ("both", *JAWS):
        raise ValueError(f"meta jaw {jaw!r} is not one of both/upper/lower")
    parts = ["dental photo of both jaws" if jaw == "both" else f"dental photo of {jaw} jaw"]
    shade = meta.get("shade")
    if shade is not None:
        if shade not in SHADE_WORDS:
            raise ValueError(f"meta shade {shade!r} is not one of {SHADE_WORDS}")
        parts.append(f"{shade} teeth")
    if meta.get("light_direction") is not None:
        parts.append(f"light from {light_words(meta['light_direction'])}")
    missing = _tooth_types(list(meta.get("teeth_missing", [])))
    parts.append("missing " + ", ".join(missing) if missing else "no missing teeth")
    return ", ".join(parts)


def caption_words(caption: str) -> list[str]:
    return caption.replace(",", " ").split()
