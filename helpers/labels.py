"""Label files: which mask value is which muscle on which side.

A label file is JSON in the shape MuscleMap uses::

    {"labels": [{"value": 1, "muscle": "erector_spinae", "side": "left"}, ...]}

``side`` is ``"left"``, ``"right"`` or ``null`` (an unsided label, split into sides by anatomy).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import LabelError

__all__ = [
    "KNOWN_MUSCLES",
    "SIDES",
    "Label",
    "LabelTable",
    "load_labels",
    "parse_labels",
]

SIDES = ("left", "right")
#: Muscles the toolkit knows by name; others are accepted but reported as-is.
KNOWN_MUSCLES = ("multifidus", "erector_spinae", "psoas_major", "quadratus_lumborum")


@dataclass(frozen=True)
class Label:
    """One mask value: its muscle and (anatomical) side, or ``side=None`` when unsided."""

    value: int
    muscle: str
    side: str | None


@dataclass(frozen=True)
class LabelTable:
    """The labels of one label file, in file order."""

    labels: tuple[Label, ...]
    path: Path | None = None

    @property
    def values(self) -> tuple[int, ...]:
        """Declared mask values."""
        return tuple(lab.value for lab in self.labels)

    @property
    def muscles(self) -> tuple[str, ...]:
        """Muscle names in first-seen order, without repeats."""
        return tuple(dict.fromkeys(lab.muscle for lab in self.labels))

    def by_value(self, value: int) -> Label:
        """The label with mask value ``value``."""
        for lab in self.labels:
            if lab.value == value:
                return lab
        where = self.path or Path("<labels>")
        raise LabelError(where, f"label value {value} is not declared")

    def is_sided(self) -> bool:
        """True when every label has a side."""
        return all(lab.side is not None for lab in self.labels)

    def check_values(self, present: Iterable[int], mask_path: str | Path | None = None) -> None:
        """Raise :class:`LabelError` (naming the mask) for mask values the file does not declare.

        Background (0) is always allowed.
        """
        unknown = sorted(set(int(v) for v in present) - set(self.values) - {0})
        if unknown:
            declared = ", ".join(str(v) for v in self.values)
            where = mask_path or self.path or Path("<mask>")
            msg = f"mask holds label values {unknown} not in the label file (declared: {declared})"
            raise LabelError(where, msg)


def parse_labels(document: object, path: str | Path | None = None) -> LabelTable:
    """Validate a decoded label document and build a :class:`LabelTable`.

    Raises
    ------
    LabelError
        Naming the file and the offending entry.
    """
    where = Path(path) if path is not None else Path("<labels>")
    if not isinstance(document, dict) or not isinstance(document.get("labels"), list):
        raise LabelError(where, 'expected a JSON object with a "labels" list')
    labels: list[Label] = []
    for i, entry in enumerate(document["labels"]):
        if not isinstance(entry, dict):
            raise LabelError(where, f"labels[{i}] is not an object")
        value, muscle, side = entry.get("value"), entry.get("muscle"), entry.get("side")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LabelError(where, f"labels[{i}].value must be a positive integer, got {value!r}")
        if not isinstance(muscle, str) or not muscle.strip():
            raise LabelError(where, f"labels[{i}].muscle must be a non-empty string")
        if side is not None and side not in SIDES:
            msg = f"labels[{i}].side must be 'left', 'right' or null, got {side!r}"
            raise LabelError(where, msg)
        labels.append(Label(int(value), muscle.strip(), side))
    if not labels:
        raise LabelError(where, "no labels declared")
    values = [lab.value for lab in labels]
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise LabelError(where, f"label values declared twice: {dupes}")
    pairs = [(lab.muscle, lab.side) for lab in labels]
    dup_pairs = sorted({p for p in pairs if pairs.count(p) > 1}, key=str)
    if dup_pairs:
        raise LabelError(where, f"muscle/side declared twice: {dup_pairs}")
    return LabelTable(tuple(labels), Path(path) if path is not None else None)


def load_labels(path: str | Path) -> LabelTable:
    """Read and validate a label JSON file."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(path, "label file not found")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(path, f"not valid JSON ({exc})") from exc
    return parse_labels(document, path)
