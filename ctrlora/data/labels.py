"""The segmentation label table.

Label ids are the 8-bit values stored in ``segmentation.png``. The table is declared in
params.yaml ``labels`` (a list of ``{id, name, colour}``) and read from the params file the first
time it is asked for (``$CTRLORA_PARAMS`` names another file; a params file without ``labels``, or
no params file at all, gives :data:`DEFAULT_LABELS`). :meth:`LabelTable.from_entries` builds a
table from an explicit list instead.

The default labels teeth by *type* and *jaw* (not by individual tooth): the left and right canine
of the upper jaw share one label. A table may number teeth instead (FDI 11..48, docs/data.md);
clinic data then lands with those ids, while the renderer, which draws only the default's tooth
types, refuses such a table by name.

A label's colour is its display colour and also the segmentation condition's encoding
(:func:`color_lut`, what the VAE sees): changing a colour changes every prepared segmentation image.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

JAWS = ("upper", "lower")
TOOTH_TYPES = ("incisor", "canine", "premolar", "molar")
BACKGROUND = 0  # every table has it: unannotated pixels, the renderer's empty mouth, the importer's fill
BACKGROUND_NAME = "background"
GINGIVA_NAME = "gingiva"
UNKNOWN_COLOUR = (255, 0, 255)  # what color_lut gives an id outside the table; no label may take it
# the labels the renderer draws (by name); a table without them cannot render
RENDER_LABELS = (BACKGROUND_NAME, GINGIVA_NAME, *(f"{jaw}_{kind}" for jaw in JAWS for kind in TOOTH_TYPES))

# rule name -> meaning; a LabelTableError names one of them
LABEL_RULES: dict[str, str] = {
    "label_list": "the table is a non-empty list of {id, name, colour} entries, nothing else in an entry",
    "label_id": "an id is an integer in 0..255 (the 8-bit value of segmentation.png)",
    "label_name": "a name is a non-empty string of letters, digits, '_', '-' or '.' (quote numbers in YAML)",
    "label_colour": f"a colour is [r, g, b] of integers in 0..255, not the unknown-id colour {UNKNOWN_COLOUR}",
    "unique_label_id": "no two labels share an id",
    "unique_label_name": "no two labels share a name",
    "unique_label_colour": "no two labels share a colour (the condition encodes labels by colour; colour masks "
                           "are read by it)",
    "background_label": f"id {BACKGROUND} is the label named {BACKGROUND_NAME!r}",
}
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class LabelTableError(ValueError):
    """A label table breaks one of :data:`LABEL_RULES` (named in the message)."""

    def __init__(self, rule: str, detail: str, where: str = "params labels"):
        super().__init__(f"{where}: {rule}: {detail} (rule: {LABEL_RULES[rule]})")
        self.rule = rule


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    color: tuple[int, int, int]  # display colour, also the segmentation condition's encoding


def _default_labels() -> tuple[Label, ...]:
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
    teeth = [(f"{jaw}_{kind}", colors[(jaw, kind)]) for jaw in JAWS for kind in TOOTH_TYPES]
    named = [(BACKGROUND_NAME, (0, 0, 0)), (GINGIVA_NAME, (200, 40, 60)), *teeth]
    return tuple(Label(i, name, color) for i, (name, color) in enumerate(named))


# background 0, gingiva 1, the 8 tooth types by jaw 2..9: params.yaml's default, and the table of a
# params file without `labels`
DEFAULT_LABELS: tuple[Label, ...] = _default_labels()


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class LabelTable:
    """A validated label table: ids, names and colours, each unique; id 0 is ``background``."""

    def __init__(self, labels: Iterable[Label], where: str = "labels"):
        labels = tuple(labels)
        if not labels:
            raise LabelTableError("label_list", "the table is empty", where)
        by_id: dict[int, Label] = {}
        by_name: dict[str, Label] = {}
        by_colour: dict[tuple[int, int, int], Label] = {}
        for lab in labels:
            if not _is_int(lab.id) or not 0 <= lab.id <= 255:
                raise LabelTableError("label_id", f"label {lab.name!r} has id {lab.id!r}", where)
            if not isinstance(lab.name, str) or not _NAME.fullmatch(lab.name):
                raise LabelTableError("label_name", f"label {lab.id} has name {lab.name!r}", where)
            color = lab.color
            if (not isinstance(color, (tuple, list)) or len(color) != 3
                    or not all(_is_int(c) and 0 <= c <= 255 for c in color) or tuple(color) == UNKNOWN_COLOUR):
                raise LabelTableError("label_colour", f"label {lab.name!r} has colour {color!r}", where)
            if lab.id in by_id:
                raise LabelTableError("unique_label_id", f"id {lab.id} is {by_id[lab.id].name!r} and {lab.name!r}",
                                      where)
            if lab.name in by_name:
                raise LabelTableError("unique_label_name", f"name {lab.name!r} has ids {by_name[lab.name].id} "
                                                           f"and {lab.id}", where)
            key = (int(color[0]), int(color[1]), int(color[2]))
            if key in by_colour:
                raise LabelTableError("unique_label_colour", f"{by_colour[key].name!r} and {lab.name!r} are both "
                                                             f"{key}", where)
            lab = Label(int(lab.id), lab.name, key)
            by_id[lab.id], by_name[lab.name], by_colour[key] = lab, lab, lab
        if BACKGROUND not in by_id or by_id[BACKGROUND].name != BACKGROUND_NAME:
            found = f"id {BACKGROUND} is {by_id[BACKGROUND].name!r}" if BACKGROUND in by_id else f"no id {BACKGROUND}"
            raise LabelTableError("background_label", found, where)
        self.labels: tuple[Label, ...] = tuple(by_id.values())  # in declaration order
        self.by_id: dict[int, Label] = by_id
        self.by_name: dict[str, Label] = by_name
        self.colour_ids: dict[tuple[int, int, int], int] = {c: lab.id for c, lab in by_colour.items()}
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[:] = UNKNOWN_COLOUR
        for lab in self.labels:
            lut[lab.id] = lab.color
        lut.setflags(write=False)
        self._lut = lut

    @classmethod
    def from_entries(cls, entries: Any, where: str = "params labels") -> "LabelTable":
        """From a list of ``{id, name, colour}`` mappings (params.yaml's ``labels``)."""
        if not isinstance(entries, (list, tuple)) or not entries:
            raise LabelTableError("label_list", f"expected a non-empty list, got {type(entries).__name__}", where)
        labels = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or set(entry) != {"id", "name", "colour"}:
                got = sorted(map(str, entry)) if isinstance(entry, Mapping) else type(entry).__name__
                raise LabelTableError("label_list", f"entry {i} has {got}, expected exactly id, name, colour", where)
            colour = entry["colour"]
            labels.append(Label(entry["id"], entry["name"], tuple(colour) if isinstance(colour, list) else colour))
        return cls(labels, where)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelTable) and self.labels == other.labels

    def __hash__(self) -> int:
        return hash(self.labels)

    def __repr__(self) -> str:
        return f"LabelTable({len(self.labels)} labels, ids {min(self.by_id)}..{max(self.by_id)})"

    @property
    def ids(self) -> tuple[int, ...]:
        """Every label id, ascending."""
        return tuple(sorted(self.by_id))

    @property
    def num_classes(self) -> int:
        """Class count of a segmenter over this table: the largest id + 1, so a label id is its
        class index (ids between labels are classes no pixel carries)."""
        return max(self.by_id) + 1

    @property
    def tooth_ids(self) -> frozenset[int]:
        """Ids of every label but background and gingiva."""
        return frozenset(i for i, lab in self.by_id.items() if lab.name not in (BACKGROUND_NAME, GINGIVA_NAME))

    def id_of(self, name: str) -> int:
        """The id of the label ``name``."""
        try:
            return self.by_name[name].id
        except KeyError:
            raise ValueError(f"the label table has no label {name!r} (labels: {', '.join(self.by_name)})") from None

    def require(self, names: Iterable[str], user: str) -> None:
        """Raise ValueError naming every label of ``names`` this table lacks (``user`` needs them)."""
        missing = [n for n in names if n not in self.by_name]
        if missing:
            raise ValueError(f"{user} needs labels the label table lacks: {', '.join(missing)} "
                             f"(params labels has: {', '.join(self.by_name)})")

    def color_lut(self) -> np.ndarray:
        """256×3 uint8 lookup table: label id → colour (ids outside the table: :data:`UNKNOWN_COLOUR`)."""
        return self._lut.copy()


DEFAULT_TABLE = LabelTable(DEFAULT_LABELS)


def table_from_params(params: Mapping[str, Any]) -> LabelTable:
    """The table of a loaded params file: its ``labels`` section, or the default without one."""
    section = params.get("labels")
    return DEFAULT_TABLE if section is None else LabelTable.from_entries(section)


_PARAMS_ENV = "CTRLORA_PARAMS"
_TABLES: dict[str | None, LabelTable] = {}  # $CTRLORA_PARAMS at the time of reading -> its table


def label_table(refresh: bool = False) -> LabelTable:
    """The project's label table, read once per params file (``$CTRLORA_PARAMS`` or the project's
    params.yaml; ``refresh`` reads it again). Without a params file it is the default, unless
    ``$CTRLORA_PARAMS`` names one that is missing."""
    key = os.environ.get(_PARAMS_ENV) or None
    if refresh or key not in _TABLES:
        from ctrlora.params import load_params

        try:
            params = load_params()
        except FileNotFoundError:
            if key is not None:
                raise
            params = {}
        _TABLES[key] = table_from_params(params)
    return _TABLES[key]


def num_classes() -> int:
    """Class count of a segmenter over the project's table (largest id + 1)."""
    return label_table().num_classes


def label_id(name: str) -> int:
    """Id of the label ``name`` in the project's table."""
    return label_table().id_of(name)


def tooth_label(jaw: str, kind: str) -> int:
    """Label id of a tooth type in a jaw, e.g. ``tooth_label("upper", "canine") == 3``."""
    try:
        return label_table().by_name[f"{jaw}_{kind}"].id
    except KeyError:
        raise ValueError(f"no label for jaw={jaw!r} tooth type={kind!r}: the label table has no "
                         f"{jaw}_{kind!s} label") from None


def color_lut() -> np.ndarray:
    """256×3 uint8 lookup table of the project's table: label id → display colour (unknown ids map
    to magenta)."""
    return label_table().color_lut()


def __getattr__(name: str) -> Any:
    # the module-level views of the project's table, computed when asked so that the params file
    # is read lazily (and $CTRLORA_PARAMS set before the first use applies)
    if name == "LABELS":  # id -> Label
        return dict(label_table().by_id)
    if name == "LABEL_IDS":  # name -> id
        return {n: lab.id for n, lab in label_table().by_name.items()}
    if name == "TOOTH_LABEL_IDS":
        return label_table().tooth_ids
    if name == "GINGIVA":
        return label_table().id_of(GINGIVA_NAME)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
