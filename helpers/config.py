"""Study configuration: one YAML file describes a study; :func:`load_study` validates it up front.

Every other part of the pipeline (the runner, the four notebooks) reads the validated
:class:`Study`, never the raw YAML.  Every problem is reported with the file, the key and what is
wrong, for example::

    study.yml: metrics.fat_method: 'gmm4' is not one of gmm3, gmm2, kmeans2, otsu, unmix
    (did you mean 'gmm3'?)

Relative paths resolve against the YAML file's folder.  A minimal study::

    study: lumbar2024                  # name: letters, digits, '.', '_' and '-'
    images: images/*_T2w.nii.gz        # glob pattern, CSV manifest or BIDS-like folder
    labels: labels.json
    model: models/paraspinal.zip       # nnU-Net v2 model (zip or folder)

Every key (:data:`STUDY_KEYS`)::

    study: lumbar2024
    description: ADS cohort, baseline scans        # shown in the reports
    images: images/*_T2w.nii.gz    # or: cohort.csv (subject,image[,mask,manual_mask,levels])
                                   # or: bids/ (sub-*/anat/*_T2w.nii.gz, sub-*/ses-*/anat/...)
                                   # or explicitly {pattern: ...} / {manifest: ...} / {bids: ...}
    labels: labels.json            # {"labels": [{"value": 1, "muscle": ..., "side": ...}]}
    model: models/paraspinal.zip   # needed unless every subject has a mask
    masks: masks/{subject}_dseg.nii.gz        # optional: existing masks, no segmentation
    manual_masks: manual/                     # optional: for the QC Dice check
    levels: levels.csv             # slice -> level: one CSV with a subject column, a folder,
                                   # or a pattern with {subject}
    clinical:                      # optional; without it the statistics notebook is skipped
      path: clinical.xlsx
      skip_invalid: true           # score valid rows, list invalid ones (default true)
      columns: {Patient: subject, Geschlecht: sex}   # site column -> standard column
      values: {sex: {m: M, w: F}}                     # site codes -> standard values
      missing_values: ["NA", "-99"]
      sheet: Baseline
    segmentation: {device: auto, fast: true}          # helpers.segment.SegmentSettings
    metrics: {fat_method: gmm3, bias_correction: true, lfiar_floor_pct: 0.5}
                                                      # helpers.metrics.MetricsSettings
    qc: {min_dice: 0.8, z_edge_status: flag}          # helpers.qc.QCSettings
    statistics:
      covariates: [age, bmi]       # partial Spearman
      indices: [cdi, cdi_abs, lfiar, lfiar_log]       # also cdi_cc, cdi_cc_abs, lfiar_cc, ...
      scores: null                 # null = every score the clinical data allow
      muscles: null                # restrict muscles / levels (null = all)
      levels: [all]
      family: group                # FDR family (helpers.stats.correlation_table)
      top_pairs: 4                 # scatter plots of the strongest pairs
      alpha: 0.05
    executor: {kind: processes, workers: 2}           # or sequential, or dask
    output: reports/lumbar2024     # default reports/<study>; runs go to <output>/<run-id>/
    ingest:                        # instead of images: DICOM export -> pseudonymized NIfTI
      dicom: exports/lumbar2024    # folder searched recursively for DICOM files
      out: ingested                # default <output>/ingested (NIfTI + ingest.csv)
      key: ../private/pseudonym_key.csv   # required; outside the output and out folders
      secret: ../private/pseudonym_key.secret   # optional (default: key with suffix .secret)
      rules: {allow_fat_suppressed: false, max_axial_angle_deg: 30}
                                   # helpers.dicom.IngestRules
    dixon: {segment_on: sum, erode_mm: 0}   # helpers.dixon.DixonSettings; Dixon subjects have
                                   # *_water/*_fat.nii.gz beside the image or manifest columns
                                   # water, fat
    contrast: T2w                  # for images whose name (_T1w/_T2w) or manifest does not say
    mixed_contrast: false          # true: allow T1w, T2w and Dixon subjects in one cohort

With ``ingest:`` the cohort is what the ingest wrote (``<out>/ingest.csv``, rows with status
``written``); before the first ingest the study has no subject yet (``esma run`` ingests first,
``esma ingest --study STUDY.yml`` does only that).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from helpers.errors import ConfigError, EsmaError
from helpers.nifti import subject_from_filename
from helpers.validate import SettingError, did_you_mean

__all__ = [
    "ASYMMETRY_INDICES",
    "CONVEX_CONCAVE_INDICES",
    "STUDY_KEYS",
    "ClinicalSpec",
    "IngestSpec",
    "StatisticsSpec",
    "Study",
    "SubjectFiles",
    "load_study",
    "parse_study",
    "resolved_document",
]

if TYPE_CHECKING:  # the settings classes live with the stage that uses them
    from helpers.dixon import DixonSettings
    from helpers.executor import ExecutorConfig
    from helpers.metrics import MetricsSettings
    from helpers.qc import QCSettings
    from helpers.segment import SegmentSettings

log = logging.getLogger(__name__)

#: Top-level keys of a study file and what they hold.
STUDY_KEYS: dict[str, str] = {
    "study": "study name (letters, digits, '.', '_', '-'); names the report folder",
    "description": "free text shown in the reports (optional)",
    "images": "glob pattern, CSV manifest (subject,image[,mask,manual_mask,levels]) "
    "or BIDS-like folder (sub-*/anat/*_T2w.nii.gz)",
    "labels": "label JSON file (value, muscle, side)",
    "model": "nnU-Net v2 model, exported .zip or results folder (needed unless masks are given)",
    "masks": "existing masks used instead of segmentation: pattern with {subject} or a folder",
    "manual_masks": "manual masks for the QC Dice check: pattern with {subject} or a folder",
    "corrections": "reviewer-corrected masks that replace the model's or given mask: pattern "
    "with {subject} or a folder (subjects without one keep theirs)",
    "levels": "slice->vertebral level CSV: pattern with {subject}, a folder, or one CSV with a "
    "subject column",
    "clinical": "clinical CSV/Excel path, or {path, skip_invalid, columns, values, ...}",
    "segmentation": "segmentation settings (device, folds, step_size, mirror_tta, fast)",
    "metrics": "measurement settings (fat_method, bias_correction, ...)",
    "qc": "quality-control settings",
    "statistics": "statistics settings (covariates, indices, scores, muscles, levels, ...)",
    "executor": "how per-subject work runs (kind: sequential | processes | dask, ...)",
    "output": "output folder; runs go to OUTPUT/<run-id>/ (default reports/<study>)",
    "ingest": "DICOM export to ingest instead of images: {dicom, out, key, secret, rules}",
    "dixon": "Dixon water/fat settings (segment_on: sum | water | fat | image, erode_mm, ...)",
    "contrast": "contrast of images whose name or manifest row does not say: T1w | T2w",
    "mixed_contrast": "true to allow a cohort mixing T1w, T2w and Dixon subjects (default false)",
}
REQUIRED_KEYS = ("study", "images", "labels")
#: Keys of the ``ingest`` section (``dicom`` and ``key`` required).
INGEST_KEYS = ("dicom", "out", "key", "secret", "rules")
#: Default ingest output folder, inside the study's output folder.
DEFAULT_INGEST_OUT = "ingested"

#: Asymmetry indices written by the metrics stage (left vs right), correlated by default.
ASYMMETRY_INDICES = ("cdi", "cdi_abs", "lfiar", "lfiar_log")
#: Convex-vs-concave versions, present when the clinical data give the curve's convex side.
CONVEX_CONCAVE_INDICES = ("cdi_cc", "cdi_cc_abs", "lfiar_cc", "lfiar_cc_log")
DEFAULT_COVARIATES = ("age", "bmi")
#: Keys of the ``clinical`` section: the file, whether invalid rows are skipped (and listed)
#: rather than stopping the run, and the site mapping of :class:`helpers.clinical.ClinicalMapping`.
CLINICAL_KEYS = (
    "path",
    "skip_invalid",
    "columns",
    "values",
    "missing_values",
    "sheet",
    "sep",
    "decimal",
    "encoding",
)
STATISTICS_KEYS = (
    "covariates",
    "indices",
    "scores",
    "muscles",
    "levels",
    "family",
    "top_pairs",
    "alpha",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MASK_SUFFIXES = (".nii.gz", "_dseg.nii.gz", "_T2w_dseg.nii.gz", "_mask.nii.gz", ".nii")
_LEVELS_SUFFIXES = ("_levels.csv", ".csv")
_LOOKS_LIKE_MASK = re.compile(r"(_dseg|_mask|_seg|_label|_labels)\.nii(\.gz)?$")


# ----------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class SubjectFiles:
    """Input files of one subject (absolute paths).

    Attributes
    ----------
    subject : str
        Pseudonymous subject ID (file-name based unless a manifest names it).
    image : Path
        Axial T2 image.
    mask : Path or None
        Existing mask to use instead of segmentation.
    manual_mask : Path or None
        Manual mask for the QC Dice check.
    levels : Path or None
        Slice -> vertebral level CSV.
    water, fat : Path or None
        Dixon water and fat images (issue 18): fat is then measured as ``F / (W + F)``.  A
        subject given only as a Dixon pair has ``image`` = its water image (for displays).
    contrast : str
        ``T1w``, ``T2w`` or ``dixon`` (see :data:`CONTRASTS`); ``""`` when nothing says.
    corrected_mask : Path or None
        A reviewer's corrected mask (study key ``corrections:``); replaces ``mask`` and the
        model's segmentation.
    """

    subject: str
    image: Path
    mask: Path | None = None
    manual_mask: Path | None = None
    levels: Path | None = None
    water: Path | None = None
    fat: Path | None = None
    contrast: str = ""
    corrected_mask: Path | None = None


@dataclass(frozen=True)
class ClinicalSpec:
    """Where the clinical data are and how their columns map onto esma's names.

    Attributes
    ----------
    path : Path
        Clinical CSV or Excel file.
    mapping : dict
        The site mapping (columns, values, missing_values, sheet, sep, decimal) for
        :func:`helpers.clinical.load_clinical`; empty for a file in the standard layout.
    skip_invalid : bool
        Score the valid rows and list the invalid ones (default) instead of stopping the run.
    table : pandas.DataFrame or None
        The file as read when the study was validated (the one read of it per process).
    """

    path: Path
    mapping: dict[str, Any] = field(default_factory=dict)
    skip_invalid: bool = True
    table: pd.DataFrame | None = field(default=None, compare=False, repr=False)

    def data(self) -> pd.DataFrame:
        """The clinical table in the standard layout (a copy of the one read; read if none)."""
        if self.table is None:
            from helpers.clinical import load_clinical

            object.__setattr__(self, "table", load_clinical(self.path, self.mapping or None))
        return self.table.copy()  # type: ignore[union-attr]


@dataclass(frozen=True)
class IngestSpec:
    """The study's DICOM export and how it is ingested (:func:`helpers.dicom.ingest_once`).

    Attributes
    ----------
    dicom : Path
        DICOM folder, searched recursively.
    out : Path
        Ingest output folder: ``<pseudonym>_T2w.nii.gz`` files and ``ingest.csv``.
    key : Path
        Pseudonym key CSV (private; never inside ``out`` or the study's output folder).
    secret : Path or None
        Pseudonym secret file; None = the key path with suffix ``.secret``.
    rules : dict
        Validated :class:`helpers.dicom.IngestRules` fields.
    """

    dicom: Path
    out: Path
    key: Path
    secret: Path | None = None
    rules: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> Path:
        """The ingest's ``ingest.csv`` (one row per DICOM series)."""
        return self.out / "ingest.csv"

    def ingest_rules(self) -> Any:
        """:class:`helpers.dicom.IngestRules` built from ``rules``."""
        from helpers.dicom import IngestRules

        return IngestRules.from_mapping(dict(self.rules))


@dataclass(frozen=True)
class StatisticsSpec:
    """What the statistics notebook correlates.

    Attributes
    ----------
    covariates : tuple of str
        Covariates of the partial Spearman correlations (default age, bmi).
    indices : tuple of str
        Asymmetry indices to correlate (default cdi, cdi_abs, lfiar, lfiar_log).
    scores : tuple of str or None
        Score columns; None = every score the clinical data allow.
    muscles, levels : tuple of str or None
        Restrict to these muscles / vertebral levels; None = all present.
    family : str
        FDR family passed to :func:`helpers.stats.correlation_table` (default ``"group"``).
    top_pairs : int
        Number of index x score pairs shown as scatter plots.
    alpha : float
        Significance level for the FDR-adjusted p values.
    """

    covariates: tuple[str, ...] = DEFAULT_COVARIATES
    indices: tuple[str, ...] = ASYMMETRY_INDICES
    scores: tuple[str, ...] | None = None
    muscles: tuple[str, ...] | None = None
    levels: tuple[str, ...] | None = None
    family: str = "group"
    top_pairs: int = 4
    alpha: float = 0.05


@dataclass(frozen=True)
class Study:
    """A validated study.

    Attributes
    ----------
    name : str
        Study name.
    source : Path
        The YAML file it was read from.
    subjects : tuple of SubjectFiles
        The cohort, sorted by subject ID.
    labels : Path
        Label JSON file.
    model : Path or None
        Segmentation model (zip or folder); None when every subject has a given mask.
    clinical : ClinicalSpec or None
        Clinical data, when given.
    segmentation, metrics, qc, executor : dict
        Validated option mappings of each stage (build the settings objects with the
        ``*_settings`` methods).
    statistics : StatisticsSpec
        Statistics options.
    output : Path
        Output folder: run folders, the shared work folder and the QC decisions file live here.
    description : str
        Free text for the reports.
    images_spec : str
        How the images were found (for the reports).
    ingest : IngestSpec or None
        The DICOM export the images come from (``ingest:`` key); with it, ``subjects`` are the
        images the last ingest wrote (none before the first ingest).
    """

    name: str
    source: Path
    subjects: tuple[SubjectFiles, ...]
    labels: Path
    model: Path | None
    clinical: ClinicalSpec | None
    segmentation: dict[str, Any]
    metrics: dict[str, Any]
    qc: dict[str, Any]
    statistics: StatisticsSpec
    executor: dict[str, Any]
    output: Path
    description: str = ""
    images_spec: str = ""
    ingest: IngestSpec | None = None
    dixon: dict[str, Any] = field(default_factory=dict)
    mixed_contrast: bool = False

    @property
    def subject_ids(self) -> list[str]:
        """Subject IDs in cohort order."""
        return [s.subject for s in self.subjects]

    @property
    def uses_given_masks(self) -> bool:
        """True when the study gives masks (no segmentation step)."""
        return any(s.mask is not None for s in self.subjects)

    @property
    def contrasts(self) -> dict[str, str]:
        """Subject -> its contrast (``T2w``, ``T1w``, ``dixon``), in cohort order."""
        return {s.subject: s.contrast for s in self.subjects}

    @property
    def work_dir(self) -> Path:
        """Per-stage work folder shared by every run (segmentations, per-subject metrics)."""
        return self.output / "work"

    @property
    def decisions_path(self) -> Path:
        """The reviewer's QC decisions file (kept across runs, never overwritten by a run)."""
        return self.output / "qc_decisions.csv"

    def subject(self, subject_id: str) -> SubjectFiles:
        """The files of one subject."""
        for s in self.subjects:
            if s.subject == subject_id:
                return s
        msg = f"{self.source.name}: no subject {subject_id!r} in the study"
        raise ConfigError(msg)

    def cohort_table(self) -> pd.DataFrame:
        """The cohort as a DataFrame (subject, image, mask, manual_mask, levels, water, fat,
        contrast; str paths)."""
        rows = [
            {
                "subject": s.subject,
                "image": str(s.image),
                "mask": "" if s.mask is None else str(s.mask),
                "manual_mask": "" if s.manual_mask is None else str(s.manual_mask),
                "levels": "" if s.levels is None else str(s.levels),
                "water": "" if s.water is None else str(s.water),
                "fat": "" if s.fat is None else str(s.fat),
                "contrast": s.contrast,
            }
            for s in self.subjects
        ]
        return pd.DataFrame(rows, columns=["subject", "image", "mask", "manual_mask", "levels",
                                           "water", "fat", "contrast"])

    def _settings(self, name: str, build: Callable[[], Any]) -> Any:
        """The settings object ``name``, built once per study (the study is frozen)."""
        cache = self.__dict__.setdefault("_built_settings", {})
        if name not in cache:
            cache[name] = build()
        return cache[name]

    def metrics_settings(self) -> MetricsSettings:
        """:class:`helpers.metrics.MetricsSettings` of the ``metrics`` section (built once)."""
        from helpers.metrics import MetricsSettings

        return self._settings("metrics", lambda: MetricsSettings.from_mapping(dict(self.metrics)))

    def qc_settings(self) -> QCSettings:
        """:class:`helpers.qc.QCSettings` of the ``qc`` section (built once)."""
        from helpers.qc import QCSettings

        return self._settings("qc", lambda: QCSettings.from_mapping(dict(self.qc)))

    def segment_settings(self) -> SegmentSettings:
        """:class:`helpers.segment.SegmentSettings` of the ``segmentation`` section (built once)."""
        from helpers.segment import SegmentSettings

        return self._settings("segment", lambda: SegmentSettings(**_tuples(self.segmentation)))

    def dixon_settings(self) -> DixonSettings:
        """:class:`helpers.dixon.DixonSettings` of the ``dixon`` section (built once)."""
        from helpers.dixon import DixonSettings

        return self._settings("dixon", lambda: DixonSettings.from_mapping(dict(self.dixon)))

    def executor_config(self) -> ExecutorConfig:
        """:class:`helpers.executor.ExecutorConfig` of the ``executor`` section (built once)."""
        from helpers.executor import ExecutorConfig

        return self._settings("executor", lambda: ExecutorConfig.from_mapping(dict(self.executor)))


# --------------------------------------------------------------------------------- loading
def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML file.

    Parameters
    ----------
    path : str or Path
        The study file.

    Returns
    -------
    Study

    Raises
    ------
    ConfigError
        Missing or unreadable file, invalid YAML, unknown or missing keys, wrong types, missing
        input files, an empty cohort, duplicate subjects, or settings another module refuses;
        the message names the file, the key and the problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"{path}: study file not found"
        raise ConfigError(msg)
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read study file ({exc})"
        raise ConfigError(msg) from exc
    except DuplicateKeyError as exc:
        msg = f"{path}: {exc}"
        raise ConfigError(msg) from exc
    except yaml.YAMLError as exc:
        msg = f"{path}: not valid YAML ({_one_line(exc)})"
        raise ConfigError(msg) from exc
    return parse_study(document, path.resolve())


def parse_study(document: object, source: str | Path) -> Study:
    """Validate a decoded study document; relative paths resolve against ``source``'s folder.

    See :func:`load_study`.
    """
    source = Path(source)
    v = _Validator(source)
    if not isinstance(document, dict):
        v.fail("", "expected a mapping of keys (study:, images:, labels:, ...)")
    has_ingest = document.get("ingest") is not None
    required = tuple(k for k in REQUIRED_KEYS if not (has_ingest and k == "images"))
    v.check_keys("", document, STUDY_KEYS, required)
    if has_ingest and document.get("images") is not None:
        v.fail("images", "give either images: or ingest: (the images are what it writes), not both")

    name = v.string("study", document["study"])
    if not _NAME_RE.match(name):
        v.fail("study", f"{name!r} may hold only letters, digits, '.', '_' and '-'")
    description = v.string("description", document.get("description") or "", allow_empty=True)

    labels = v.existing_file("labels", document["labels"])
    _check_labels(v, labels)

    output_raw = document.get("output")
    output = v.path("output", output_raw) if output_raw else source.parent / "reports" / name
    if output.exists() and not output.is_dir():
        v.fail("output", f"{output} exists and is not a folder")

    ingest = _ingest(v, document.get("ingest"), output)
    if ingest is None:
        subjects, images_spec = _find_images(v, document["images"])
    else:
        subjects, images_spec = _from_ingest(v, ingest), f"DICOM ingest ({ingest.out.name}/)"
    subjects = _attach(v, "masks", document.get("masks"), subjects, _MASK_SUFFIXES, "mask")
    subjects = _attach(
        v, "manual_masks", document.get("manual_masks"), subjects, _MASK_SUFFIXES, "manual_mask"
    )
    subjects = _attach(v, "levels", document.get("levels"), subjects, _LEVELS_SUFFIXES, "levels")
    subjects = _attach(
        v, "corrections", document.get("corrections"), subjects, _MASK_SUFFIXES, "corrected_mask"
    )
    dixon, mixed_contrast, subjects = _contrasts(v, document, subjects)

    model = None
    if document.get("model") is not None:
        from helpers.segment import BUNDLED_MODELS

        given = document["model"]
        model = BUNDLED_MODELS[given] if given in BUNDLED_MODELS else v.path("model", given)
        if not model.exists():
            v.fail("model", f"{model}: model not found (a .zip or an nnU-Net results folder)")
    if model is None and not all(
        s.mask is not None or s.corrected_mask is not None for s in subjects
    ):
        missing = [s.subject for s in subjects if s.mask is None and s.corrected_mask is None]
        v.fail(
            "model",
            "no segmentation model given and no mask for "
            f"{_preview(missing)}: give model: or masks:",
        )

    _check_boolean_settings(v, document)  # issue 16: 'false' (a string) is not a boolean
    clinical = _clinical(v, document.get("clinical"))
    segmentation = _segmentation(v, document.get("segmentation"))
    metrics = _delegate(v, "metrics", document.get("metrics"), _metrics_factory)
    qc = _delegate(v, "qc", document.get("qc"), _qc_factory)
    executor = _delegate(v, "executor", document.get("executor"), _executor_factory)
    statistics = _statistics(v, document.get("statistics"))

    return Study(
        name=name,
        source=source,
        subjects=tuple(sorted(subjects, key=lambda s: s.subject)),
        labels=labels,
        model=model,
        clinical=clinical,
        segmentation=segmentation,
        metrics=metrics,
        qc=qc,
        statistics=statistics,
        executor=executor,
        output=output,
        description=description,
        images_spec=images_spec,
        ingest=ingest,
        dixon=dixon,
        mixed_contrast=mixed_contrast,
    )


def resolved_document(study: Study, manifest: str | Path) -> dict[str, Any]:
    """A study document with absolute paths and the cohort frozen in a manifest CSV.

    The pipeline writes it into each run folder so that every notebook of a run reads the same
    cohort and settings even if the original YAML or image folder changes meanwhile;
    ``parse_study(resolved_document(s, m), ...)`` gives back an equal study once the manifest
    (``study.cohort_table()``) is written to ``manifest``.
    """
    stats = dataclasses.asdict(study.statistics)
    stats = {k: (list(val) if isinstance(val, tuple) else val) for k, val in stats.items()}
    doc: dict[str, Any] = {
        "study": study.name,
        "description": study.description,
        "images": {"manifest": str(Path(manifest).resolve())},
        "labels": str(study.labels),
        "segmentation": dict(study.segmentation),
        "metrics": dict(study.metrics),
        "qc": dict(study.qc),
        "executor": dict(study.executor),
        "statistics": stats,
        "output": str(study.output),
    }
    if study.dixon:
        doc["dixon"] = dict(study.dixon)
    if study.mixed_contrast:
        doc["mixed_contrast"] = True
    if study.model is not None:
        doc["model"] = str(study.model)
    if study.clinical is not None:
        doc["clinical"] = {
            "path": str(study.clinical.path),
            "skip_invalid": study.clinical.skip_invalid,
            **study.clinical.mapping,
        }
    return doc


# ------------------------------------------------------------------------------ validation
class _Validator:
    """Builds messages ``<file>: <key>: <problem>`` and resolves paths against the YAML folder."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.root = source.parent

    def fail(self, key: str, problem: str) -> Any:
        where = f"{self.source.name}: {key}: " if key else f"{self.source.name}: "
        raise ConfigError(where + problem)

    def check_keys(
        self, key: str, mapping: Mapping[str, Any], allowed: Sequence[str], required=()
    ) -> None:
        for k in mapping:
            if not isinstance(k, str):
                self.fail(key, f"key {k!r} is not a string")
            if k not in allowed:
                where = f"{key}.{k}" if key else k
                self.fail(
                    where, f"unknown key{did_you_mean(k, allowed)}; allowed: " + ", ".join(allowed)
                )
        for k in required:
            if mapping.get(k) is None:
                where = f"{key}.{k}" if key else k
                self.fail(where, "required key is missing")

    def string(self, key: str, value: object, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            self.fail(key, f"expected a non-empty string, got {value!r}")
        return value.strip()  # type: ignore[union-attr]

    def path(self, key: str, value: object) -> Path:
        text = self.string(key, value)
        p = Path(text).expanduser()
        return (p if p.is_absolute() else self.root / p).resolve()

    def existing_file(self, key: str, value: object) -> Path:
        p = self.path(key, value)
        if not p.is_file():
            self.fail(key, f"{p}: file not found")
        return p

    def mapping(self, key: str, value: object) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping (key: value lines), got {type(value).__name__}")
        return dict(value)  # type: ignore[arg-type]

    def str_list(self, key: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            items = [x.strip() for x in value.split(",") if x.strip()]
        elif isinstance(value, list) and all(isinstance(x, str) for x in value):
            items = [x.strip() for x in value]
        else:
            self.fail(key, f"expected a list of names, got {value!r}")
        return tuple(items)


def _check_labels(v: _Validator, path: Path) -> None:
    from helpers.labels import load_labels

    try:
        load_labels(path)
    except EsmaError as exc:
        v.fail("labels", str(exc))


def _find_images(v: _Validator, spec: object) -> tuple[list[SubjectFiles], str]:
    """Resolve ``images:`` into subjects: a glob pattern, a CSV manifest or a BIDS-like tree."""
    kind, value = None, spec
    if isinstance(spec, dict):
        v.check_keys("images", spec, ("pattern", "manifest", "bids"))
        if len(spec) != 1:
            v.fail("images", "give exactly one of pattern:, manifest: or bids:")
        kind, value = next(iter(spec.items()))
    text = v.string("images", value)
    resolved = v.path("images", text)
    if kind is None:
        if text.lower().endswith(".csv"):
            kind = "manifest"
        elif resolved.is_dir():
            kind = "bids"
        else:
            kind = "pattern"
    if kind == "manifest":
        return _from_manifest(v, resolved), f"manifest {resolved.name}"
    if kind == "bids":
        return _from_bids(v, resolved), f"BIDS-like folder {resolved.name}"
    return _from_pattern(v, text), f"pattern {text}"


def _from_pattern(v: _Validator, pattern: str) -> list[SubjectFiles]:
    full = Path(pattern).expanduser()
    full = full if full.is_absolute() else v.root / full
    files = sorted(Path(p).resolve() for p in glob.glob(str(full), recursive=True))
    files = [f for f in files if f.is_file()]
    if not files:
        v.fail("images", f"pattern {pattern!r} matches no file (searched {full})")
    masks = [f.name for f in files if _LOOKS_LIKE_MASK.search(f.name)]
    if masks:
        v.fail(
            "images",
            f"pattern {pattern!r} also matches mask files ({_preview(masks)}); "
            "narrow it, e.g. images/*_T2w.nii.gz",
        )
    not_nifti = [f.name for f in files if not f.name.endswith((".nii", ".nii.gz"))]
    if not_nifti:
        v.fail("images", f"pattern {pattern!r} matches non-NIfTI files ({_preview(not_nifti)})")
    return _unique(v, [SubjectFiles(subject_from_filename(f), f) for f in files])


def _from_bids(v: _Validator, root: Path) -> list[SubjectFiles]:
    files = sorted(root.glob("sub-*/anat/*_T2w.nii*")) + sorted(
        root.glob("sub-*/ses-*/anat/*_T2w.nii*")
    )
    if not files:
        v.fail(
            "images",
            f"{root}: no sub-*/anat/*_T2w.nii.gz (or sub-*/ses-*/anat/...) files in this folder; "
            "for a plain folder give a pattern such as DIR/*.nii.gz",
        )
    return _unique(v, [SubjectFiles(subject_from_filename(f), f.resolve()) for f in files])


def _from_manifest(v: _Validator, path: Path) -> list[SubjectFiles]:
    if not path.is_file():
        v.fail("images", f"{path}: manifest not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        v.fail("images", f"{path}: unreadable CSV manifest ({_one_line(exc)})")
    table.columns = [str(c).strip() for c in table.columns]
    allowed = ("subject", "image", "mask", "manual_mask", "levels", "water", "fat", "contrast")
    extra = [c for c in table.columns if c not in allowed]
    if "image" not in table.columns:
        v.fail(
            "images", f"{path.name}: manifest needs an 'image' column (has {list(table.columns)})"
        )
    if extra:
        log.info("%s: ignoring manifest columns %s", path.name, extra)
    if table.empty:
        v.fail("images", f"{path.name}: manifest lists no subject")
    base = path.parent
    subjects = []
    for i, row in table.iterrows():
        line = int(i) + 2  # header is line 1

        def _file(col: str, row=row, line=line) -> Path | None:
            text = str(row.get(col, "")).strip()
            if not text:
                return None
            p = Path(text).expanduser()
            p = (p if p.is_absolute() else base / p).resolve()
            if not p.is_file():
                v.fail("images", f"{path.name} line {line}: {col} {p}: file not found")
            return p

        image = _file("image")
        water, fat = _file("water"), _file("fat")
        if (water is None) != (fat is None):
            v.fail("images", f"{path.name} line {line}: give both water and fat (a Dixon pair)")
        if image is None and water is None:
            v.fail("images", f"{path.name} line {line}: empty image (and no water/fat pair)")
        image = image if image is not None else water
        subject = str(row.get("subject", "")).strip() or subject_from_filename(image)
        subjects.append(
            SubjectFiles(subject, image, _file("mask"), _file("manual_mask"), _file("levels"),
                         water, fat, str(row.get("contrast", "")).strip())
        )
    return _unique(v, subjects)


def _unique(v: _Validator, subjects: list[SubjectFiles]) -> list[SubjectFiles]:
    bad = [s.subject for s in subjects if not _NAME_RE.match(s.subject)]
    if bad:
        v.fail(
            "images",
            f"subject IDs {_preview(bad)} may hold only letters, digits, '.', '_' and '-'",
        )
    seen: dict[str, Path] = {}
    for s in subjects:
        if s.subject in seen:
            v.fail(
                "images",
                f"subject {s.subject!r} appears twice ({seen[s.subject].name} and {s.image.name})",
            )
        seen[s.subject] = s.image
    return subjects


def _attach(
    v: _Validator,
    key: str,
    spec: object,
    subjects: list[SubjectFiles],
    suffixes: Sequence[str],
    attribute: str,
) -> list[SubjectFiles]:
    """Fill one per-subject file (mask, manual_mask, levels) from a pattern or a folder."""
    if spec is None or not subjects:  # no subject yet: a study whose DICOM is not ingested
        return subjects
    text = v.string(key, spec)
    if attribute == "levels" and "{subject}" not in text and v.path(key, text).is_file():
        # one cohort-wide levels CSV with a subject column (helpers.metrics.read_levels)
        shared = v.path(key, text)
        return [
            s if s.levels is not None else dataclasses.replace(s, levels=shared) for s in subjects
        ]
    if "{subject}" in text:

        def find(subject: str) -> Path | None:
            p = v.path(key, text.replace("{subject}", subject))
            return p if p.is_file() else None

    else:
        folder = v.path(key, text)
        if not folder.is_dir():
            v.fail(key, f"{folder}: neither a folder nor a pattern with {{subject}}")

        def find(subject: str) -> Path | None:
            for suffix in suffixes:
                p = folder / f"{subject}{suffix}"
                if p.is_file():
                    return p
            return None

    out, missing = [], []
    for s in subjects:
        found = find(s.subject)
        if found is None and getattr(s, attribute) is None:
            missing.append(s.subject)
        out.append(s if found is None else dataclasses.replace(s, **{attribute: found}))
    if attribute == "corrected_mask":
        return out  # corrections exist for the few subjects a reviewer fixed, or none yet
    if len(missing) == len(subjects):
        v.fail(key, f"{text!r}: no file found for any subject (e.g. {subjects[0].subject})")
    if missing:
        log.warning("%s: no %s file for %s", key, attribute, _preview(missing))
    return out


def _ingest(v: _Validator, spec: object, output: Path) -> IngestSpec | None:
    """Validate the ``ingest`` section: folders exist, the key stays out of every output."""
    if spec is None:
        return None
    options = v.mapping("ingest", spec)
    v.check_keys("ingest", options, INGEST_KEYS, ("dicom", "key"))
    dicom = v.path("ingest.dicom", options["dicom"])
    if not dicom.is_dir():
        v.fail("ingest.dicom", f"{dicom}: DICOM folder not found")
    out = (
        v.path("ingest.out", options["out"])
        if options.get("out") is not None
        else output / DEFAULT_INGEST_OUT
    )
    if out.exists() and not out.is_dir():
        v.fail("ingest.out", f"{out} exists and is not a folder")
    if out.is_relative_to(dicom) or dicom.is_relative_to(out):
        v.fail("ingest.out", f"{out} and the DICOM folder {dicom} must not lie inside each other")
    key = v.path("ingest.key", options["key"])
    secret = (
        v.path("ingest.secret", options["secret"]) if options.get("secret") is not None else None
    )
    for what, path in (("key", key), ("secret", secret or key.with_suffix(".secret"))):
        for folder, name in (
            (output, "the study's output folder"),
            (out, "the ingest's out folder"),
            (dicom, "the DICOM folder"),
        ):
            if path.is_relative_to(folder):
                v.fail(
                    f"ingest.{what}",
                    f"{path} lies inside {name} {folder}; the pseudonym {what} maps study IDs "
                    "back to patients: keep it outside the DICOM export and everything esma "
                    "writes",
                )
        if path.is_dir():
            v.fail(f"ingest.{what}", f"{path} is a folder; give a file name")
    rules = _ingest_rules(v, options.get("rules"))
    return IngestSpec(dicom=dicom, out=out, key=key, secret=secret, rules=rules)


def _ingest_rules(v: _Validator, spec: object) -> dict[str, Any]:
    """Check each rule's type against :class:`helpers.dicom.IngestRules`, then build it."""
    from helpers.dicom import IngestRules

    options = v.mapping("ingest.rules", spec)
    defaults = {f.name: f.default for f in dataclasses.fields(IngestRules)}
    v.check_keys("ingest.rules", options, list(defaults))
    for name, value in options.items():
        default, where = defaults[name], f"ingest.rules.{name}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                v.fail(where, f"expected true or false, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                v.fail(where, f"expected a number, got {value!r}")
        elif isinstance(default, str):
            if not isinstance(value, str):
                v.fail(where, f"expected a regular expression (text), got {value!r}")
        elif isinstance(default, tuple) and not (
            isinstance(value, list | tuple)
            and len(value) == len(default)
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
        ):
            v.fail(where, f"expected [low, high] in ms, got {value!r}")
    try:
        IngestRules.from_mapping(options)
    except ConfigError as exc:
        text = str(exc)
        if text.startswith("ingest.") and ": " in text:  # "ingest.gap_factor: must be > 1 ..."
            field_name, _, problem = text.partition(": ")
            v.fail(f"ingest.rules.{field_name[len('ingest.') :]}", problem)
        v.fail("ingest.rules", text)
    return {k: list(val) if isinstance(val, tuple) else val for k, val in options.items()}


def _from_ingest(v: _Validator, spec: IngestSpec) -> list[SubjectFiles]:
    """The images an earlier ingest wrote (``ingest.csv`` rows with status ``written``).

    Empty when the DICOM export has not been ingested yet, or when a listed image is missing
    (the ingest runs again before the study does).
    """
    if not spec.table.is_file():
        return []
    try:
        table = pd.read_csv(spec.table, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        log.warning("%s: unreadable (%s); the DICOM is ingested again", spec.table.name, exc)
        return []
    if not {"status", "image"} <= set(table.columns):
        return []
    written = table[table["status"] == "written"]
    images = [spec.out / name for name in written["image"]]
    if not all(p.is_file() for p in images):
        return []
    # the contrast the DICOM header gave (issue 18); older ingest tables lack the column
    contrasts = list(written["contrast"]) if "contrast" in written.columns else [""] * len(images)
    return _unique(v, [SubjectFiles(subject_from_filename(p), p.resolve(), contrast=c)
                       for p, c in zip(images, contrasts, strict=True)])


def _clinical(v: _Validator, spec: object) -> ClinicalSpec | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"path": spec}
    options = v.mapping("clinical", spec)
    v.check_keys("clinical", options, CLINICAL_KEYS, ("path",))
    path = v.existing_file("clinical.path", options["path"])
    skip = options.get("skip_invalid", True)
    if not isinstance(skip, bool):
        v.fail("clinical.skip_invalid", f"expected true or false, got {skip!r}")
    mapping = {k: val for k, val in options.items() if k not in ("path", "skip_invalid")}
    from helpers.clinical import ClinicalMapping, load_clinical

    try:
        table = load_clinical(path, ClinicalMapping.from_dict(mapping, where="clinical"))
    except ConfigError as exc:
        _fail_setting(v, "clinical", exc)
    except EsmaError as exc:
        v.fail("clinical.path", str(exc))
    return ClinicalSpec(path, mapping, skip, table)


def _segmentation(v: _Validator, spec: object) -> dict[str, Any]:
    options = v.mapping("segmentation", spec)
    try:
        from helpers.segment import SegmentSettings
    except ImportError:  # pragma: no cover - segment module always ships
        return options
    names = [f.name for f in dataclasses.fields(SegmentSettings)]
    v.check_keys("segmentation", options, names)
    try:
        SegmentSettings(**_tuples(options))
    except (EsmaError, ValueError, TypeError) as exc:
        _fail_setting(v, "segmentation", exc)
    return options


def _metrics_factory(options: dict[str, Any]) -> object:
    from helpers.metrics import MetricsSettings

    return MetricsSettings.from_mapping(options)


def _qc_factory(options: dict[str, Any]) -> object:
    from helpers.qc import QCSettings

    return QCSettings.from_mapping(options)


def _executor_factory(options: dict[str, Any]) -> object:
    from helpers.executor import ExecutorConfig

    return ExecutorConfig.from_mapping(options)


def _delegate(
    v: _Validator, key: str, spec: object, factory: Callable[[dict[str, Any]], object]
) -> dict[str, Any]:
    """Validate a section by building the owning module's settings object from it."""
    options = v.mapping(key, spec)
    try:
        factory(dict(options))
    except ImportError as exc:  # pragma: no cover - every stage module ships with esma
        log.debug("%s: not validated (%s)", key, exc)
    except (EsmaError, ValueError, TypeError, KeyError) as exc:
        _fail_setting(v, key, exc)
    return options


def _fail_setting(v: _Validator, section: str, exc: Exception) -> None:
    """Re-raise another module's settings error under the study file's name and the full key.

    A :class:`helpers.validate.SettingError` carries its key: ``min_dice`` (or ``qc.min_dice``)
    of section ``qc`` becomes ``study.yml: qc.min_dice: ...``.  Any other error is put under
    ``section``.
    """
    if isinstance(exc, SettingError):
        sub = exc.key
        v.fail(sub if sub == section or sub.startswith(section + ".") else f"{section}.{sub}",
               " ".join(exc.problem.split()))
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    v.fail(section, " ".join(text.split()))


def _statistics(v: _Validator, spec: object) -> StatisticsSpec:
    options = v.mapping("statistics", spec)
    v.check_keys("statistics", options, STATISTICS_KEYS)
    kw: dict[str, Any] = {}
    if "covariates" in options:
        kw["covariates"] = (
            ()
            if options["covariates"] in (None, [])
            else v.str_list("statistics.covariates", options["covariates"])
        )
    if "indices" in options:
        indices = v.str_list("statistics.indices", options["indices"])
        known = ASYMMETRY_INDICES + CONVEX_CONCAVE_INDICES
        for name in indices:
            if name not in known:
                v.fail(
                    "statistics.indices",
                    f"{name!r} is not one of {', '.join(known)}" + did_you_mean(name, known),
                )
        if not indices:
            v.fail("statistics.indices", "name at least one index")
        kw["indices"] = indices
    for key in ("scores", "muscles", "levels"):
        if options.get(key) is not None:
            kw[key] = v.str_list(f"statistics.{key}", options[key]) or None
    if "family" in options:
        kw["family"] = v.string("statistics.family", options["family"])
    if "top_pairs" in options:
        n = options["top_pairs"]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 20:
            v.fail("statistics.top_pairs", f"expected an integer from 0 to 20, got {n!r}")
        kw["top_pairs"] = n
    if "alpha" in options:
        a = options["alpha"]
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 < a < 1:
            v.fail("statistics.alpha", f"expected a number between 0 and 1, got {a!r}")
        kw["alpha"] = float(a)
    return StatisticsSpec(**kw)


# --------------------------------------------------------------------------------- helpers
def _tuples(options: Mapping[str, Any]) -> dict[str, Any]:
    """YAML lists to tuples (the settings dataclasses are frozen and hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _preview(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ------------------------------------------------------------------- contrast, Dixon (issue 18)
#: The contrasts esma measures fat on: fat-bright T1- or T2-weighted images without fat
#: suppression, and Dixon water/fat pairs.
CONTRASTS = ("T1w", "T2w", "dixon")
_CONTRAST_SUFFIXES = {"_T1w": "T1w", "_T2w": "T2w"}


def _stem(image: Path) -> str:
    name = image.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _beside(image: Path, kind: str) -> Path | None:
    """``<stem>_water.nii.gz`` / ``_fat`` next to an image (its ``_T1w`` / ``_T2w`` dropped)."""
    stem = _stem(image)
    for suffix in _CONTRAST_SUFFIXES:
        stem = stem.removesuffix(suffix)
    for ext in (".nii.gz", ".nii"):
        p = image.parent / f"{stem}_{kind}{ext}"
        if p.is_file():
            return p.resolve()
    return None


def _normal_contrast(v: _Validator, key: str, value: str, what: str = "") -> str:
    text = value.strip()
    for c in CONTRASTS:
        if text.lower() == c.lower():
            return c
    v.fail(key, f"{what}{value!r} is not one of {', '.join(CONTRASTS)}: esma measures fat on "
                "fat-bright T1- or T2-weighted images without fat suppression and on Dixon "
                "water/fat pairs, and refuses fat-suppressed (FS, STIR, SPAIR), PD and other ones")
    return ""  # pragma: no cover - v.fail raises


def _contrasts(
    v: _Validator, document: Mapping[str, Any], subjects: list[SubjectFiles]
) -> tuple[dict[str, Any], bool, list[SubjectFiles]]:
    """Dixon pairs beside the images, each subject's contrast, and the mixing rule."""
    dixon = _delegate(v, "dixon", document.get("dixon"), _dixon_factory)
    mixed = document.get("mixed_contrast", False)
    if not isinstance(mixed, bool):
        v.fail("mixed_contrast", f"must be true or false, got {mixed!r}")
    default = ""
    if document.get("contrast") is not None:
        default = _normal_contrast(v, "contrast", v.string("contrast", document["contrast"]))
        if default == "dixon":
            v.fail("contrast", "a Dixon subject is one with water and fat images; give them "
                               "(manifest columns water, fat or files *_water/*_fat.nii.gz)")
    out = []
    for s in subjects:
        water, fat = s.water, s.fat
        given = (_normal_contrast(v, "images", s.contrast, f"{s.subject}: contrast ")
                 if s.contrast else "")
        if water is None and fat is None and given in ("", "dixon"):
            water, fat = _beside(s.image, "water"), _beside(s.image, "fat")
            if (water is None) != (fat is None):
                found = water or fat
                v.fail("images", f"{s.subject}: {found.name} has no "
                                 f"{'fat' if fat is None else 'water'} partner beside it")
        if water is not None:
            contrast = "dixon"
        elif given:
            contrast = given
            if contrast == "dixon":
                v.fail("images", f"{s.subject}: contrast dixon needs water and fat images")
        else:
            stem = _stem(s.image)
            contrast = next((c for suf, c in _CONTRAST_SUFFIXES.items() if stem.endswith(suf)),
                            default)
        out.append(dataclasses.replace(s, water=water, fat=fat, contrast=contrast))
    if dixon.get("segment_on") == "image":
        pair_only = [s.subject for s in out if s.water is not None and s.image == s.water]
        if pair_only:
            v.fail("dixon.segment_on", "'image', but there is no image to segment on, only a "
                                       f"water/fat pair, for {_preview(pair_only)}")
    kinds = sorted({s.contrast or "unspecified" for s in out})
    if len(kinds) > 1 and not mixed:
        counts = ", ".join(f"{sum((s.contrast or 'unspecified') == k for s in out)} {k}"
                           for k in kinds)
        v.fail("mixed_contrast", f"the cohort mixes contrasts ({counts}); fat fractions from "
                                 "different contrasts are not interchangeable: set "
                                 "mixed_contrast: true to allow it (and stratify by contrast)")
    return dixon, bool(mixed), out


def _dixon_factory(options: dict[str, Any]) -> object:
    from helpers.dixon import DixonSettings

    return DixonSettings.from_mapping(options)


# ---------------------------------------------------- strict YAML: duplicate keys, booleans
class DuplicateKeyError(yaml.YAMLError):
    """A mapping of the study YAML holds the same key twice (YAML would keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key; the mapping constructor says so
                continue
            if first != line:
                msg = (
                    f"key {key!r} appears twice in one mapping (lines {first} and {line}); "
                    "YAML would silently keep the last: remove one"
                )
                raise DuplicateKeyError(msg)
        return super().construct_mapping(node, deep=deep)


#: Sections whose settings class has boolean fields: (section, module, class name).
_BOOLEAN_SECTIONS = (
    ("segmentation", "helpers.segment", "SegmentSettings"),
    ("metrics", "helpers.metrics", "MetricsSettings"),
    ("qc", "helpers.qc", "QCSettings"),
    ("executor", "helpers.executor", "ExecutorConfig"),
)


def _check_boolean_settings(v: _Validator, document: Mapping[str, Any]) -> None:
    """Refuse a non-boolean value (``'false'``, ``0``, ``"yes"``) for a boolean setting.

    Python's ``bool('false')`` is True, so a quoted ``'false'`` would silently turn a setting
    on.  The fields whose annotation is ``bool`` (or ``bool | None``, which also takes null) of
    each section's settings dataclass are checked.
    """
    import importlib

    for section, module_name, class_name in _BOOLEAN_SECTIONS:
        options = document.get(section)
        if not isinstance(options, Mapping):
            continue
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):  # pragma: no cover - every module ships
            continue
        for f in dataclasses.fields(cls):
            kind = str(f.type).replace(" ", "")
            if kind not in ("bool", "bool|None", "Optional[bool]") or f.name not in options:
                continue
            value = options[f.name]
            if value is None and kind != "bool":
                continue
            if not isinstance(value, bool):
                v.fail(
                    f"{section}.{f.name}",
                    f"expected true or false, got {value!r} ({type(value).__name__}); "
                    "write it without quotes",
                )
