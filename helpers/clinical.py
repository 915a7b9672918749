"""Clinical data: the standard input layout, reading and validating it, and synthetic cohorts.

The standard layout
-------------------
One row per subject, one column per item, blank = not answered.  Column names, units and the
values each column accepts (:data:`LAYOUT`; :func:`layout_table` lists it as a table):

=====================  ==========================================  =============================
column                 meaning                                     accepted values
=====================  ==========================================  =============================
subject                pseudonymous subject ID (joins imaging)     any non-blank text, unique
sex                    sex                                         ``M`` / ``F`` (case ignored)
age                    age (years)                                 0-120
bmi                    body-mass index (kg/m2)                     10-80
cobb_deg (optional)    Cobb angle of the major curve (degrees)     0-180
convex_side (opt.)     side of the curve's convexity               ``left`` / ``right``
odi_1 .. odi_10        ODI v2.1a sections                          whole numbers 0-5
srs_1 .. srs_22        SRS-22r items, 1 = worst, 5 = best          whole numbers 1-5
vas_back, vas_leg      pain VAS (mm from the "no pain" end)        0-100
joa_* (optional)       JOA low-back score items (see below)        per item
joa_pre_total (opt.)   JOA total before treatment                  -6 to 29
=====================  ==========================================  =============================

``subject``, ``sex``, ``age`` and ``bmi`` must be columns of the file (cells may be blank).  An
instrument is given all or nothing: a file with some ODI (or SRS-22r, or JOA) item columns must
have all of them; one with none of them gets missing scores for that instrument.  Columns the
layout does not know are ignored (and logged).

JOA low-back score items (JOA 1986/1994, maximum 29 points): subjective symptoms
``joa_back_pain``, ``joa_leg_pain``, ``joa_gait`` (0-3 each); clinical signs ``joa_slr``,
``joa_sensory``, ``joa_motor`` (0-2 each); restriction of daily activities
``joa_adl_turn_over``, ``joa_adl_standing``, ``joa_adl_washing``, ``joa_adl_leaning``,
``joa_adl_sitting``, ``joa_adl_lifting``, ``joa_adl_walking`` (0-2 each, 2 = no restriction);
urinary bladder ``joa_bladder`` (0 normal, -3 mild dysuria, -6 severe dysuria).  When the items
are the follow-up assessment, ``joa_pre_total`` (the total before treatment) gives the recovery
rate.

Mapping a site's layout
-----------------------
A site's file (CSV or Excel) with other column names or codes maps onto the standard layout
through a mapping, usually the ``clinical`` section of the study YAML::

    clinical:
      path: data/clinical.xlsx
      sheet: Baseline            # Excel only; default: first sheet
      sep: ";"                   # CSV only; default: "," (";" detected when the header has no ",")
      decimal: ","               # decimal separator of numbers; default "."
      missing_values: ["NA", "-99"]   # cell texts meaning "not answered" (blank always does)
      columns:                   # site column -> standard column
        Patient: subject
        Geschlecht: sex
        Alter: age
        ODI Q1: odi_1
      values:                    # per standard column (or fnmatch pattern): site code -> value
        sex: {male: M, female: F, m: M, w: F}
        convex_side: {L: left, R: right}
        "srs_*": {a: 5, b: 4, c: 3, d: 2, e: 1}   # printed options ordered best-to-worst

Columns not named under ``columns`` keep their names, so a file already in the standard layout
needs no mapping.  Value maps compare the stripped cell text; codes not in a map pass through
unchanged (and are then validated).  Mapping errors raise :class:`helpers.errors.ConfigError`
naming the key; file problems raise :class:`helpers.errors.InputFileError` naming the file.

Validation (:func:`validate_clinical`) reports every out-of-range value, non-number and
duplicated or blank subject with its subject, column and row, so the caller can stop
(:class:`ClinicalDataError`) or score the rest.

Synthetic data
--------------
:func:`simulate_asymmetry` makes an ``asymmetry.csv``-shaped table and :func:`simulate_clinical`
a clinical table in the standard layout for the same subjects, with a planted relation
(:class:`PlantedRelation`, default: ODI rising with erector spinae ``cdi_abs`` at level "all" in
men only) that the statistics must find.
"""

from __future__ import annotations

import codecs
import fnmatch
import logging
import math
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from helpers.errors import ConfigError, InputFileError
from helpers.files import atomic_path
from helpers.validate import SettingError

__all__ = [
    "DEMOGRAPHIC_COLUMNS",
    "JOA_ITEMS",
    "JOA_PRE_TOTAL",
    "LAYOUT",
    "ODI_ITEMS",
    "SRS_ITEMS",
    "VAS_COLUMNS",
    "ClinicalDataError",
    "ClinicalMapping",
    "ColumnSpec",
    "PlantedRelation",
    "apply_mapping",
    "layout_table",
    "load_clinical",
    "load_mapping",
    "simulate_asymmetry",
    "simulate_clinical",
    "validate_clinical",
    "write_table",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class ColumnSpec:
    """What one standard column holds and which values it accepts.

    Attributes
    ----------
    name : str
        Standard column name.
    kind : {"text", "choice", "int", "float"}
        ``int`` accepts whole numbers only (``3`` and ``3.0``, not ``3.5``).
    low, high : float, optional
        Inclusive range of ``int`` / ``float`` columns.
    allowed : tuple, optional
        The accepted values of a ``choice`` column, or of an ``int`` column with a value set.
    unit : str
        Unit or meaning, for documentation.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    allowed: tuple[Any, ...] = ()
    unit: str = ""

    def describe(self) -> str:
        """The accepted values, in words."""
        if self.kind == "choice":
            return " / ".join(str(a) for a in self.allowed)
        if self.allowed:
            return "one of " + ", ".join(f"{a:g}" for a in self.allowed)
        if self.kind == "int":
            return f"whole numbers {self.low:g} to {self.high:g}"
        if self.kind == "float":
            return f"numbers {self.low:g} to {self.high:g}"
        return "non-blank text"


ODI_ITEMS: tuple[str, ...] = tuple(f"odi_{i}" for i in range(1, 11))
SRS_ITEMS: tuple[str, ...] = tuple(f"srs_{i}" for i in range(1, 23))
VAS_COLUMNS: tuple[str, ...] = ("vas_back", "vas_leg")
#: JOA low-back score items and their maximum points (bladder: 0, -3 or -6).
JOA_ITEMS: dict[str, int] = {
    "joa_back_pain": 3,
    "joa_leg_pain": 3,
    "joa_gait": 3,
    "joa_slr": 2,
    "joa_sensory": 2,
    "joa_motor": 2,
    "joa_adl_turn_over": 2,
    "joa_adl_standing": 2,
    "joa_adl_washing": 2,
    "joa_adl_leaning": 2,
    "joa_adl_sitting": 2,
    "joa_adl_lifting": 2,
    "joa_adl_walking": 2,
    "joa_bladder": 0,
}
JOA_BLADDER_VALUES = (0, -3, -6)
JOA_PRE_TOTAL = "joa_pre_total"
#: Subject descriptors carried from the clinical table into the scores table.
DEMOGRAPHIC_COLUMNS: tuple[str, ...] = ("subject", "sex", "age", "bmi", "cobb_deg", "convex_side")
#: Columns every clinical file must have (cells may be blank, except subject).
REQUIRED_COLUMNS: tuple[str, ...] = ("subject", "sex", "age", "bmi")
#: Item groups given all or nothing.
INSTRUMENTS: dict[str, tuple[str, ...]] = {
    "ODI": ODI_ITEMS,
    "SRS-22r": SRS_ITEMS,
    "JOA": tuple(JOA_ITEMS),
}
SEX_VALUES = ("M", "F")
SIDE_VALUES = ("left", "right")
#: Plausibility limits of the descriptors (a typo such as an age of 640 stops the run).
AGE_RANGE_Y = (0.0, 120.0)
BMI_RANGE_KG_M2 = (10.0, 80.0)
COBB_RANGE_DEG = (0.0, 180.0)


def _build_layout() -> dict[str, ColumnSpec]:
    specs = [
        ColumnSpec("subject", "text", unit="pseudonymous subject ID"),
        ColumnSpec("sex", "choice", allowed=SEX_VALUES, unit="M / F"),
        ColumnSpec("age", "float", *AGE_RANGE_Y, unit="years"),
        ColumnSpec("bmi", "float", *BMI_RANGE_KG_M2, unit="kg/m2"),
        ColumnSpec("cobb_deg", "float", *COBB_RANGE_DEG, unit="degrees"),
        ColumnSpec("convex_side", "choice", allowed=SIDE_VALUES, unit="side of the convexity"),
    ]
    specs += [ColumnSpec(c, "int", 0, 5, unit="ODI section points") for c in ODI_ITEMS]
    specs += [ColumnSpec(c, "int", 1, 5, unit="SRS-22r item, 5 = best") for c in SRS_ITEMS]
    specs += [ColumnSpec(c, "float", 0, 100, unit="mm") for c in VAS_COLUMNS]
    for name, top in JOA_ITEMS.items():
        if name == "joa_bladder":
            specs.append(ColumnSpec(name, "int", -6, 0, allowed=JOA_BLADDER_VALUES, unit="points"))
        else:
            specs.append(ColumnSpec(name, "int", 0, top, unit="points"))
    specs.append(ColumnSpec(JOA_PRE_TOTAL, "float", -6, 29, unit="JOA points before treatment"))
    return {s.name: s for s in specs}


#: Every standard column, in output order.
LAYOUT: dict[str, ColumnSpec] = _build_layout()


def layout_table() -> pd.DataFrame:
    """The standard layout as a table (column, kind, unit, accepted values), for documentation."""
    return pd.DataFrame(
        [
            {"column": s.name, "kind": s.kind, "unit": s.unit, "accepted": s.describe()}
            for s in LAYOUT.values()
        ]
    )


class ClinicalDataError(InputFileError):
    """Clinical values that cannot be scored; the message names subject, column and row.

    Attributes
    ----------
    problems : pandas.DataFrame
        One row per problem: row, subject, column, value, problem.
    """

    def __init__(self, path: str | Path, problems: pd.DataFrame) -> None:
        self.problems = problems
        n = len(problems)
        shown = "; ".join(_describe_problem(p) for p in problems.head(5).itertuples())
        more = f" (and {n - 5} more)" if n > 5 else ""
        noun = "invalid value" if n == 1 else "invalid values"
        super().__init__(path, f"{n} {noun}: {shown}{more}")


def _describe_problem(p: Any) -> str:
    return f"subject {p.subject!r}, column {p.column!r} (row {p.row}): {p.problem}"


# ------------------------------------------------------------------------------ the mapping
MAPPING_KEYS = ("columns", "values", "missing_values", "sheet", "sep", "decimal", "encoding")


@dataclass(frozen=True)
class ClinicalMapping:
    """How a site's clinical file maps onto the standard layout (see the module docstring).

    Attributes
    ----------
    columns : dict
        Site column name -> standard column name.
    values : dict
        Standard column name or fnmatch pattern -> {site code: standard value}.
    missing_values : tuple of str
        Cell texts that mean "not answered", besides a blank cell.
    sheet : str or int, optional
        Excel sheet name or 0-based index (default: the first sheet).
    sep : str, optional
        CSV field separator (default: ``,``, or ``;`` when the header has ``;`` and no ``,``).
    decimal : str
        Decimal separator of numbers in the file (``.`` or ``,``).
    encoding : str, optional
        Text encoding of a CSV file (default UTF-8, with or without BOM), e.g. ``latin-1`` or
        ``cp1252`` for a spreadsheet saved on an older Windows system.
    """

    columns: dict[str, str] = field(default_factory=dict)
    values: dict[str, dict[str, str]] = field(default_factory=dict)
    missing_values: tuple[str, ...] = ()
    sheet: str | int | None = None
    sep: str | None = None
    decimal: str = "."
    encoding: str | None = None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any] | None, where: str = "mapping") -> ClinicalMapping:
        """Build and validate a mapping from a config dictionary.

        Parameters
        ----------
        doc : mapping or None
            Keys ``columns``, ``values``, ``missing_values``, ``sheet``, ``sep``, ``decimal``
            (all optional).  Other keys of a study's ``clinical`` section (``path``) are ignored.
        where : str
            The config key holding ``doc``, used in error messages.

        Raises
        ------
        SettingError
            A key has the wrong type, or a column maps onto an unknown or already-used
            standard column (the error's key is ``<where>.<key>``).
        """
        if doc is not None and not isinstance(doc, Mapping):
            setting = where
            msg = "expected a mapping with keys columns, values, missing_values, ..."
            raise SettingError(setting, msg)
        doc = dict(doc or {})
        unknown = sorted(set(doc) - set(MAPPING_KEYS) - {"path"})
        if unknown:
            # The study's clinical section may hold other keys (path, covariates, ...);
            # a misspelt mapping key would otherwise vanish without a trace.
            log.warning("%s: keys %s are not mapping keys %s", where, unknown, MAPPING_KEYS)
        columns = doc.get("columns") or {}
        if not isinstance(columns, Mapping):
            setting = f"{where}.columns"
            msg = "expected a mapping site column -> standard column"
            raise SettingError(setting, msg)
        seen: dict[str, str] = {}
        clean_columns: dict[str, str] = {}
        for site, std in columns.items():
            std = str(std).strip()
            if std not in LAYOUT:
                setting = f"{where}.columns.{site}"
                msg = (
                    f"unknown standard column {std!r} "
                    f"(known: subject, sex, age, bmi, cobb_deg, convex_side, odi_1..odi_10, "
                    f"srs_1..srs_22, vas_back, vas_leg, joa_*)"
                )
                raise SettingError(setting, msg)
            if std in seen:
                setting = f"{where}.columns"
                msg = f"{seen[std]!r} and {site!r} both map onto {std!r}"
                raise SettingError(setting, msg)
            seen[std] = str(site)
            clean_columns[str(site)] = std
        values = doc.get("values") or {}
        if not isinstance(values, Mapping):
            setting = f"{where}.values"
            msg = "expected a mapping standard column -> {code: value}"
            raise SettingError(setting, msg)
        clean_values: dict[str, dict[str, str]] = {}
        for pattern, codes in values.items():
            if not isinstance(codes, Mapping):
                setting = f"{where}.values.{pattern}"
                msg = "expected a mapping site code -> value"
                raise SettingError(setting, msg)
            if not fnmatch.filter(LAYOUT, str(pattern)):
                setting = f"{where}.values.{pattern}"
                msg = "matches no standard column"
                raise SettingError(setting, msg)
            clean_values[str(pattern)] = {_code(k): _code(v) for k, v in codes.items()}
        missing = doc.get("missing_values") or ()
        if isinstance(missing, str) or not isinstance(missing, Iterable):
            missing = (missing,)
        decimal = str(doc.get("decimal", "."))
        if decimal not in (".", ","):
            setting = f"{where}.decimal"
            msg = f"must be '.' or ',', got {decimal!r}"
            raise SettingError(setting, msg)
        sep = doc.get("sep")
        if sep is not None and (not isinstance(sep, str) or len(sep) != 1):
            setting = f"{where}.sep"
            msg = f"must be one character, got {sep!r}"
            raise SettingError(setting, msg)
        sheet = doc.get("sheet")
        if sheet is not None and not isinstance(sheet, str | int):
            setting = f"{where}.sheet"
            msg = f"must be a sheet name or a 0-based index, got {sheet!r}"
            raise SettingError(setting, msg)
        encoding = doc.get("encoding")
        if encoding is not None:
            try:
                codecs.lookup(str(encoding))
            except LookupError as exc:
                setting = f"{where}.encoding"
                msg = f"unknown text encoding {encoding!r} (e.g. latin-1, cp1252)"
                raise SettingError(setting, msg) from exc
            encoding = str(encoding)
        return cls(
            columns=clean_columns,
            values=clean_values,
            missing_values=tuple(_code(m) for m in missing),
            sheet=sheet,
            sep=sep,
            decimal=decimal,
            encoding=encoding,
        )


def _code(value: Any) -> str:
    """A config value as cell text: YAML's ``1`` and ``1.0`` both mean the cell text ``1``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


# ---------------------------------------------------------------------------------- reading
def load_mapping(path: str | Path) -> ClinicalMapping:
    """Read a mapping from a YAML file (its top level, or its ``clinical`` section).

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or holds a malformed mapping (message names the file).
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        msg = f"{path}: cannot read the clinical mapping ({exc})"
        raise ConfigError(msg) from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        msg = f"{path}: the clinical mapping must be a YAML mapping"
        raise ConfigError(msg)
    where = f"{path}: mapping"
    if "clinical" in doc:
        doc, where = doc["clinical"], f"{path}: clinical"
    return ClinicalMapping.from_dict(doc, where=where)


def load_clinical(
    path: str | Path, mapping: ClinicalMapping | Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Read a clinical CSV or Excel file and map it onto the standard layout.

    Only I/O and renaming happen here; values are checked by :func:`validate_clinical` (which
    :func:`helpers.scores.score_clinical` calls).

    Parameters
    ----------
    path : path
        ``.csv`` / ``.tsv`` / ``.txt`` (text) or ``.xlsx`` / ``.xlsm`` / ``.xls`` (Excel).
    mapping : ClinicalMapping or dict, optional
        The site's mapping (see the module docstring); ``None`` for a file in the standard layout.

    Returns
    -------
    pandas.DataFrame
        One row per file row, standard column names, every cell as stripped text (``""`` for a
        blank or a declared missing value).  ``df.attrs["source"]`` holds the path, which error
        messages name.

    Raises
    ------
    InputFileError
        The file is missing, unreadable, empty, lacks a required column, names a column the
        mapping expects but the file lacks, or gives an instrument only in part.
    ConfigError
        The mapping is malformed.
    """
    path = Path(path)
    if not isinstance(mapping, ClinicalMapping):
        mapping = ClinicalMapping.from_dict(mapping)
    if not path.is_file():
        raise InputFileError(path, "clinical file not found")
    raw = _read_raw(path, mapping)
    df = apply_mapping(raw, mapping, source=path)
    df.attrs["source"] = str(path)
    return df


def _read_raw(path: Path, mapping: ClinicalMapping) -> pd.DataFrame:
    suffix = path.suffix.lower()
    encoding = mapping.encoding or "utf-8-sig"
    try:
        if suffix in (".xlsx", ".xlsm", ".xls"):
            sheet = 0 if mapping.sheet is None else mapping.sheet
            raw = pd.read_excel(path, sheet_name=sheet, dtype=str, keep_default_na=False)
        else:
            sep = mapping.sep
            if sep is None:
                with path.open(encoding=encoding, errors="replace") as fh:
                    header = fh.readline()
                sep = "\t" if suffix == ".tsv" else ","
                if ";" in header and "," not in header:
                    sep = ";"
            raw = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding=encoding)
    except UnicodeDecodeError as exc:  # issue 16: say how to read it
        msg = (
            f"cannot read clinical table: not {encoding} text (undecodable byte at offset "
            f"{exc.start} of a block); give the file's encoding, e.g. encoding: latin-1 in the "
            "clinical mapping (esma scores --encoding latin-1)"
        )
        raise InputFileError(path, msg) from exc
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        # pandas' EmptyDataError and ParserError are ValueErrors; a missing sheet is a
        # ValueError or KeyError; a file that is not a workbook is a BadZipFile.
        raise InputFileError(path, f"cannot read clinical table ({exc})") from exc
    if raw.shape[0] == 0:
        raise InputFileError(path, "clinical table has no data rows")
    raw.columns = [str(c).strip() for c in raw.columns]
    return raw


def apply_mapping(
    raw: pd.DataFrame,
    mapping: ClinicalMapping | Mapping[str, Any] | None = None,
    *,
    source: str | Path = "clinical table",
) -> pd.DataFrame:
    """Rename and recode a site's table onto the standard layout (pure; see :func:`load_clinical`).

    Parameters
    ----------
    raw : pandas.DataFrame
        The site's table as read (any dtypes).
    mapping : ClinicalMapping or dict, optional
        The site's mapping.
    source : path or str
        Named in error messages.

    Returns
    -------
    pandas.DataFrame
        Standard columns (plus the unknown ones, left as they are), cells as stripped text.
    """
    if not isinstance(mapping, ClinicalMapping):
        mapping = ClinicalMapping.from_dict(mapping)
    df = raw.copy()
    df.columns = [str(c).strip() for c in df.columns]
    lacking = [c for c in mapping.columns if c not in df.columns]
    if lacking:
        problem = f"the mapping names column(s) {lacking} that the file lacks"
        raise InputFileError(source, f"{problem} (columns found: {list(df.columns)})")
    # A target that already names another, unmapped column of the file would collide.
    clash = [
        std
        for site, std in mapping.columns.items()
        if std in df.columns and std != site and std not in mapping.columns
    ]
    if clash:
        problem = f"column(s) {clash} exist in the file and are also mapping targets"
        raise InputFileError(source, problem)
    df = df.rename(columns=mapping.columns)
    duplicated = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if duplicated:
        raise InputFileError(source, f"duplicated column name(s) {duplicated}")
    missing_codes = set(mapping.missing_values)
    for col in df.columns:
        text = df[col].map(_cell_text)
        if missing_codes:
            text = text.where(~text.isin(missing_codes), "")
        for pattern, codes in mapping.values.items():
            if fnmatch.fnmatchcase(col, pattern):
                text = text.map(lambda v, codes=codes: codes.get(v, v))
        if mapping.decimal == "," and col in LAYOUT and LAYOUT[col].kind in ("int", "float"):
            text = text.str.replace(",", ".", regex=False)
        df[col] = text.astype(object)
    _check_columns(df, source)
    unknown = [c for c in df.columns if c not in LAYOUT]
    if unknown:
        log.info("%s: ignoring column(s) not in the standard layout: %s", source, unknown)
    df.attrs["source"] = str(source)
    return df


def _check_columns(df: pd.DataFrame, source: str | Path) -> None:
    """Required columns present; every instrument given all or nothing."""
    absent = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if absent:
        problem = f"missing column(s) {absent} (columns found: {list(df.columns)})"
        raise InputFileError(source, problem)
    for name, items in INSTRUMENTS.items():
        have = [c for c in items if c in df.columns]
        if have and len(have) < len(items):
            lack = [c for c in items if c not in df.columns]
            problem = (
                f"has {name} item column(s) {have} but lacks {lack}: give every {name} item "
                f"column (blank cells for unanswered items) or none"
            )
            raise InputFileError(source, problem)


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ------------------------------------------------------------------------------- validation
def validate_clinical(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check every value of a standard-layout table and convert it to numbers.

    Parameters
    ----------
    df : pandas.DataFrame
        From :func:`load_clinical` (cells as text) or a numeric table in the standard layout
        (e.g. from :func:`simulate_clinical`).  ``df.attrs["source"]`` names the file.

    Returns
    -------
    clean : pandas.DataFrame
        The rows without any problem: ``subject`` (str), ``sex`` (``M``/``F``/missing),
        ``convex_side`` (``left``/``right``/missing) and every other standard column present as
        float (NaN = not answered).  Unknown columns are dropped.
    problems : pandas.DataFrame
        One row per problem: ``row`` (1-based data row; the file line is ``row + 1``),
        ``subject``, ``column``, ``value`` (the text found), ``problem``.  A duplicated subject
        lists each of its rows.

    Notes
    -----
    Problems: blank subject; duplicated subject; a non-number in a numeric column; a number out
    of its range; a fraction where a whole number is required; a code outside a choice column's
    values.  A row with any problem is left out of ``clean`` as a whole.

    Raises
    ------
    InputFileError
        A required column is missing or an instrument is given in part (the table as a whole
        is unusable, so no row is scored).
    """
    _check_columns(df, df.attrs.get("source", "clinical table"))
    subjects = df["subject"].map(_cell_text)
    subj = subjects.to_numpy(dtype=object)
    rows = np.arange(1, len(df) + 1)
    problems: list[dict[str, Any]] = []

    def add(mask: np.ndarray, column: str, values: np.ndarray, problem: str) -> None:
        for i in np.flatnonzero(mask):
            problems.append(
                {
                    "row": int(rows[i]),
                    "subject": subj[i],
                    "column": column,
                    "value": values[i],
                    "problem": problem,
                }
            )

    blank = subj == ""
    add(blank, "subject", subj, "blank subject ID")
    dup = subjects.duplicated(keep=False).to_numpy() & ~blank
    for name in dict.fromkeys(subj[dup]):
        where = rows[subj == name].tolist()
        add(subj == name, "subject", subj, f"duplicated subject (rows {where})")

    columns: dict[str, np.ndarray] = {"subject": subj}
    for col in df.columns:
        spec = LAYOUT.get(col)
        if spec is None or col == "subject":
            continue
        text = np.array([_cell_text(v) for v in df[col].to_numpy(dtype=object)], dtype=object)
        given = text != ""
        if spec.kind == "choice":
            norm = np.array([t.upper() if col == "sex" else t.lower() for t in text], dtype=object)
            bad = given & ~np.isin(norm, list(spec.allowed))
            add(bad, col, text, f"not one of {spec.describe()}")
            columns[col] = np.where(given & ~bad, norm, None)
            continue
        num = np.asarray(
            pd.to_numeric(np.where(given, text, None), errors="coerce"), dtype=float
        )
        not_number = given & ~np.isfinite(num)
        add(not_number, col, text, f"not a number (allowed: {spec.describe()})")
        ok = given & ~not_number
        with np.errstate(invalid="ignore"):
            out_of_range = ok & ((num < spec.low) | (num > spec.high))
        add(out_of_range, col, text, f"out of range (allowed: {spec.describe()})")
        ok &= ~out_of_range
        if spec.kind == "int":
            fraction = ok & (num != np.round(num))
            add(fraction, col, text, f"not a whole number (allowed: {spec.describe()})")
            ok &= ~fraction
            if spec.allowed:
                not_allowed = ok & ~np.isin(num, [float(a) for a in spec.allowed])
                add(not_allowed, col, text, f"not allowed (allowed: {spec.describe()})")
        columns[col] = np.where(given, num, np.nan)
    clean = pd.DataFrame(columns)

    problem_df = pd.DataFrame(problems, columns=["row", "subject", "column", "value", "problem"])
    problem_df = problem_df.sort_values(["row", "column"], kind="stable").reset_index(drop=True)
    keep = ~np.isin(rows, problem_df["row"].to_numpy(dtype=int))
    clean = clean[keep].reset_index(drop=True)
    clean.attrs["source"] = df.attrs.get("source", "clinical table")
    return clean, problem_df


# ---------------------------------------------------------------------------------- writing
def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV atomically (no index, NaN as a blank cell, full float precision).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format=None, lineterminator="\n")
    return path


# ----------------------------------------------------------------------------- simulation
#: Muscles of the synthetic asymmetry tables (the label file's muscle names).
SIM_MUSCLES = ("multifidus", "erector_spinae", "psoas_major", "quadratus_lumborum")


@dataclass(frozen=True)
class PlantedRelation:
    """A monotone relation planted between one asymmetry index and one clinical score.

    Within each sex the subject's score is made a monotone function of a latent variable whose
    Spearman correlation with the index is ``rho_male`` / ``rho_female`` (Gaussian copula on the
    ranks of the index: latent = r z + sqrt(1 - r^2) e with r = 2 sin(pi rho / 6), the Pearson
    correlation whose normal-copula Spearman value is rho).  Ties of the integer-valued score and
    unanswered items pull the observed rho slightly towards 0.

    Attributes
    ----------
    index, muscle, level : str
        Which row and column of the asymmetry table drives the score.
    score : {"odi_pct", "vas_back", "vas_leg"}
        The score that follows the index.
    rho_male, rho_female : float
        Planted Spearman correlation in men and in women (-1 to 1).
    """

    index: str = "cdi_abs"
    muscle: str = "erector_spinae"
    level: str = "all"
    score: str = "odi_pct"
    rho_male: float = 0.8
    rho_female: float = 0.0

    def __post_init__(self) -> None:
        if self.score not in ("odi_pct", "vas_back", "vas_leg"):
            msg = f"PlantedRelation.score must be odi_pct, vas_back or vas_leg, not {self.score!r}"
            raise ValueError(msg)
        for name in ("rho_male", "rho_female"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                msg = f"PlantedRelation.{name} must lie in [-1, 1]"
                raise ValueError(msg)


def simulate_asymmetry(
    subjects: int | Sequence[str],
    *,
    seed: int,
    muscles: Sequence[str] = SIM_MUSCLES,
    levels: Sequence[str] = ("all",),
    cdi_sd: float = 0.08,
    lfiar_log_sd: float = 0.25,
) -> pd.DataFrame:
    """A synthetic ``asymmetry.csv`` table (stand-in for imaging in statistics tests).

    Parameters
    ----------
    subjects : int or sequence of str
        Subject IDs, or a count (IDs ``sub-0001``...).
    seed : int
        Random seed.
    muscles, levels : sequence of str
        Rows made per subject.
    cdi_sd, lfiar_log_sd : float
        Spread of the normalized FCSA difference (dimensionless) and of ln(LFIAR).

    Returns
    -------
    pandas.DataFrame
        subject, level, muscle, cdi, cdi_abs, lfiar, lfiar_log (independent draws).
    """
    ids = _subject_ids(subjects)
    rng = np.random.default_rng(seed)
    grid = pd.MultiIndex.from_product([ids, levels, muscles], names=["subject", "level", "muscle"])
    out = grid.to_frame(index=False)
    out["cdi"] = rng.normal(0.0, cdi_sd, len(out))
    out["cdi_abs"] = out["cdi"].abs()
    out["lfiar_log"] = rng.normal(0.0, lfiar_log_sd, len(out))
    out["lfiar"] = np.exp(out["lfiar_log"])
    return out[["subject", "level", "muscle", "cdi", "cdi_abs", "lfiar", "lfiar_log"]]


def _subject_ids(subjects: int | Sequence[str]) -> list[str]:
    if isinstance(subjects, int | np.integer):
        return [f"sub-{i:04d}" for i in range(1, int(subjects) + 1)]
    return [str(s) for s in subjects]


def simulate_clinical(
    asymmetry: pd.DataFrame | Sequence[str],
    *,
    seed: int,
    relation: PlantedRelation | None = PlantedRelation(),
    male_fraction: float = 0.5,
    p_missing: float = 0.02,
    joa: bool = False,
) -> pd.DataFrame:
    """A synthetic clinical table in the standard layout, with a planted relation.

    Parameters
    ----------
    asymmetry : pandas.DataFrame or sequence of str
        An asymmetry table (subject, level, muscle and index columns), e.g. from ``esma
        metrics`` on the synthetic imaging cohort or :func:`simulate_asymmetry`; or just subject
        IDs (then ``relation`` must be None).
    seed : int
        Random seed; the same seed and input give the same table.
    relation : PlantedRelation or None
        The planted relation (default: ODI with erector spinae ``cdi_abs`` at level "all",
        rho 0.8 in men, 0 in women).  Every other score is independent of the imaging.
    male_fraction : float
        Share of men (exactly ``round(n * male_fraction)`` men, assigned at random).
    p_missing : float
        Probability that any one item or VAS answer is blank.
    joa : bool
        Also make JOA items (follow-up) and ``joa_pre_total``.

    Returns
    -------
    pandas.DataFrame
        Standard layout: subject, sex, age (years), bmi (kg/m2), cobb_deg, convex_side,
        odi_1..odi_10, srs_1..srs_22, vas_back, vas_leg (mm) [, joa_* items, joa_pre_total].
        Items are nullable integers (``<NA>`` = not answered); write it with
        :func:`write_table` to get the CSV a site would send.

    Examples
    --------
    >>> asym = simulate_asymmetry(8, seed=1)
    >>> clin = simulate_clinical(asym, seed=1)
    >>> clin.shape[0], sorted(clin["sex"].unique())
    (8, ['F', 'M'])
    """
    if isinstance(asymmetry, pd.DataFrame):
        if "subject" not in asymmetry.columns:
            msg = "asymmetry table lacks a 'subject' column"
            raise ValueError(msg)
        ids = list(dict.fromkeys(asymmetry["subject"].astype(str)))
    else:
        ids = _subject_ids(asymmetry)
        if relation is not None:
            msg = "a planted relation needs an asymmetry table; pass relation=None for IDs only"
            raise ValueError(msg)
    if not 0.0 <= male_fraction <= 1.0 or not 0.0 <= p_missing < 1.0:
        msg = "male_fraction must lie in [0, 1] and p_missing in [0, 1)"
        raise ValueError(msg)
    n = len(ids)
    rng = np.random.default_rng(seed)
    sex = np.array(["F"] * n, dtype=object)
    sex[rng.permutation(n)[: round(n * male_fraction)]] = "M"
    out = pd.DataFrame({"subject": ids, "sex": sex})
    out["age"] = np.clip(np.round(rng.normal(64.0, 9.0, n)), 40, 88)
    out["bmi"] = np.clip(np.round(rng.normal(26.5, 4.0, n), 1), 17.0, 45.0)
    out["cobb_deg"] = np.clip(np.round(10.0 + rng.gamma(2.0, 8.0, n), 1), 10.0, 80.0)
    out["convex_side"] = rng.choice(list(SIDE_VALUES), n)

    health = rng.normal(size=n)  # shared by the scores that the imaging does not drive
    planted = _planted_latent(asymmetry, ids, sex, relation, rng) if relation else None

    def latent_for(score: str) -> np.ndarray:
        if planted is not None and relation is not None and relation.score == score:
            return planted
        return 0.7 * health + math.sqrt(1 - 0.49) * rng.normal(size=n)

    odi_sum = np.round(50 * sps.beta.ppf(sps.norm.cdf(latent_for("odi_pct")), 2.2, 3.0))
    odi = _spread_sum(odi_sum.astype(int), n_items=10, top=5, rng=rng)
    for j, col in enumerate(ODI_ITEMS):
        out[col] = odi[:, j]
    srs_latent = -0.7 * health + math.sqrt(1 - 0.49) * rng.normal(size=n)
    for col in SRS_ITEMS:
        item = 3.2 + 0.9 * (0.8 * srs_latent + 0.6 * rng.normal(size=n))
        out[col] = np.clip(np.round(item), 1, 5).astype(int)
    for col in VAS_COLUMNS:
        out[col] = np.round(100 * sps.beta.ppf(sps.norm.cdf(latent_for(col)), 2.0, 2.5))
    if joa:
        joa_latent = -0.7 * health + math.sqrt(1 - 0.49) * rng.normal(size=n)
        for col, top in JOA_ITEMS.items():
            if col == "joa_bladder":
                out[col] = rng.choice(JOA_BLADDER_VALUES, n, p=[0.85, 0.12, 0.03])
            else:
                level = sps.norm.cdf(0.8 * joa_latent + 0.6 * rng.normal(size=n))
                out[col] = np.minimum(np.floor(level * (top + 1)), top).astype(int)
        # Treatment helped most: the pre-treatment total lies a few points below follow-up.
        follow_up = out[list(JOA_ITEMS)].sum(axis=1).to_numpy(dtype=float)
        out[JOA_PRE_TOTAL] = np.clip(np.round(follow_up - rng.uniform(-2, 10, n)), -6, 28)
    answer_cols = [*ODI_ITEMS, *SRS_ITEMS, *VAS_COLUMNS, *(JOA_ITEMS if joa else ())]
    for col in answer_cols:
        blank = rng.random(n) < p_missing
        if col in VAS_COLUMNS:
            out[col] = out[col].astype(float).where(~blank)
        else:
            out[col] = pd.array(out[col].astype(int), dtype="Int64")
            out.loc[blank, col] = pd.NA
    return out


def _planted_latent(
    asymmetry: Any,
    ids: list[str],
    sex: np.ndarray,
    relation: PlantedRelation,
    rng: np.random.Generator,
) -> np.ndarray:
    for col in ("level", "muscle", relation.index):
        if col not in asymmetry.columns:
            msg = f"asymmetry table lacks column {col!r} needed by the planted relation"
            raise ValueError(msg)
    rows = asymmetry[
        (asymmetry["muscle"].astype(str) == relation.muscle)
        & (asymmetry["level"].astype(str) == relation.level)
    ]
    if rows.empty:
        msg = f"asymmetry table has no rows for muscle {relation.muscle!r}, level {relation.level!r}"
        raise ValueError(msg)
    x = (
        pd.to_numeric(rows[relation.index], errors="coerce")
        .groupby(rows["subject"].astype(str))
        .mean()
        .reindex(ids)
        .to_numpy(dtype=float)
    )
    noise = rng.normal(size=len(ids))
    latent = noise.copy()
    for code, rho in (("M", relation.rho_male), ("F", relation.rho_female)):
        members = np.flatnonzero((sex == code) & np.isfinite(x))
        if members.size == 0:
            continue
        ranks = sps.rankdata(x[members])
        z = sps.norm.ppf((ranks - 0.5) / members.size)
        r = 2.0 * math.sin(math.pi * rho / 6.0)
        latent[members] = r * z + math.sqrt(1.0 - r * r) * noise[members]
    return latent


def _spread_sum(
    total: np.ndarray, *, n_items: int, top: int, rng: np.random.Generator
) -> np.ndarray:
    """Random item answers (0..top each) that add up to ``total`` for every row.

    Each item has ``top`` unit slots; ``total`` of the ``n_items x top`` slots are drawn at random
    without replacement, and an item's answer is the number of its slots drawn.
    """
    total = np.clip(np.asarray(total, dtype=int), 0, n_items * top)
    keys = rng.random((total.size, n_items * top))
    rank = keys.argsort(axis=1).argsort(axis=1)
    drawn = rank < total[:, None]
    return drawn.reshape(total.size, n_items, top).sum(axis=2)
