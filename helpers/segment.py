"""Segment a cohort with a trained nnU-Net v2 model.

>>> settings = SegmentSettings.fast_preset()        # doctest: +SKIP
>>> table = segment_cohort(images, Path("data/demo_model/esma_demo_model.zip"),
...                        Path("out/masks"), settings)  # doctest: +SKIP

What it does, per subject, one at a time (bounded memory, no worker pools: safe inside Jupyter
and papermill):

1. checks the image (:func:`helpers.nifti.load_image`: missing, truncated, NaN, constant);
2. reads it with the model's own nnU-Net reader (``image_reader_writer`` in ``plans.json``), so
   the network sees exactly what ``nnUNetv2_predict_from_modelfolder`` would feed it;
3. runs nnU-Net's preprocessing, sliding-window prediction and export-resampling functions
   in this process with one predictor created once for the cohort;
4. maps the result from the reader's array order back to the file's own array order and
   *verifies* the mapping by applying it to the image too (the mask lies exactly on the input
   grid: same shape and affine, whatever the orientation);
5. models with unsided labels get left/right from :func:`helpers.labels.split_sides` (anatomy
   in world coordinates); models with sided labels never run mirror test-time augmentation
   (mirroring swaps left and right), and their sides are checked against world x;
6. writes ``<out>/<subject>.nii.gz`` atomically, a JSON sidecar ``<out>/<subject>.json`` (model
   sha256, nnunetv2/torch versions, device, effective settings, seconds, ``side_check`` and
   ``warnings``, e.g. a 2d model slicing a file whose axial axis is elsewhere), a completion
   marker, and ``<out>/labels.json`` (the label file of the masks).

On a shared CPU set ``OMP_WAIT_POLICY=PASSIVE`` before Python starts (``esma segment`` does it
for itself): spinning OpenMP threads of a busy machine make inference several times slower.

A subject already done with the same model, settings and input file is skipped unless
``overwrite``.  A subject that fails is recorded (the error names the file) and the rest go on.

Models
------
A model is an nnU-Net *trained model folder* (``dataset.json``, ``plans.json``,
``fold_K/checkpoint_final.pth``; a dataset results folder holding one such folder also works)
or a zip exported by :func:`helpers.training.export_model` / ``nnUNetv2_export_model_to_zip``.
A zip is unpacked once into ``$ESMA_CACHE/models/<sha256>/`` (default ``~/.cache/esma``),
verified against a manifest of file checksums on every later use, and, when a
``<model>.zip.sha256`` file lies beside it (or ``expected_sha256`` is given), against that.

Labels of a model come from esma's ``labels.json`` beside its ``dataset.json`` (MuscleMap shape,
written by :func:`helpers.training.export_model`); without it they are read from the names in
``dataset.json`` (``multifidus_left``, ``right_psoas`` ...; a name without a side is unsided).

Settings
--------
Default: every fold of the model, mirror TTA on (off for sided models), step size 0.5, as
nnU-Net's defaults.  ``fast`` preset (:meth:`SegmentSettings.fast_preset`, ``esma segment
--fast``): one fold (the lowest), no mirror TTA, step size 0.75, class scores resampled to the
image grid with nnU-Net's torch resampling; on CPU several times faster with a Dice within about
0.01 (``benchmarks/bench_segment.py``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from helpers.errors import ConfigError, EsmaError, InputFileError, ModelError
from helpers.files import atomic_write_text, is_done, mark_done, sha256_file
from helpers.labels import Label, LabelTable, load_labels, parse_labels
from helpers.nifti import Volume, load_image, save_like, slice_axis, subject_from_filename
from helpers.nnunet_runtime import available_cores, find_trainer_class, runtime_versions
from helpers.validate import SettingError

__all__ = [
    "FAST_STEP_SIZE",
    "ModelInfo",
    "SegmentSettings",
    "Segmenter",
    "find_images",
    "install_model",
    "labels_from_dataset_json",
    "load_model",
    "model_cache_dir",
    "segment_cohort",
]

log = logging.getLogger(__name__)

#: Sliding-window step (fraction of the patch) of the ``fast`` preset.
FAST_STEP_SIZE = 0.75
_INSTALL_MANIFEST = "esma_install.json"
_SIDES = {"left": "left", "l": "left", "lt": "left", "right": "right", "r": "right", "rt": "right"}
_SUPPORTED_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")


# ---------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SegmentSettings:
    """How to run the model.

    Attributes
    ----------
    device : {"auto", "cpu", "cuda", "mps"}
        ``auto``: CUDA if available, else Apple MPS, else CPU.
    folds : tuple, optional
        Folds to ensemble; default all folds of the model (``fast``: the lowest one).
    step_size : float, optional
        Sliding-window step as a fraction of the patch (0 < s <= 1); default 0.5
        (``fast``: :data:`FAST_STEP_SIZE`).
    mirror_tta : bool, optional
        Mirror test-time augmentation; default on (``fast``: off).  Always off for sided models.
    torch_resampling : bool, optional
        Resample the network's class scores back to the image grid with nnU-Net's torch
        resampling (``resample_torch_fornnunet``, bilinear in-plane) instead of the model's own
        (order-1 spline per class and slice); default off (``fast``: on).  A few boundary voxels
        change.
    fast : bool
        The fast preset: one fold, no mirror TTA, larger step, torch resampling of the class
        scores; explicit values above win.
    num_threads : int, optional
        CPU threads for torch (default: all cores this process may use).
    split_sides : bool
        Split unsided model labels into left/right by anatomy (:func:`helpers.labels.split_sides`).
    configuration : str, optional
        Which trained configuration to use when the model folder holds several.
    check_scan : bool
        Refuse, before segmentation, a scan the model cannot segment: not axial or too oblique,
        not a lumbar cross-section (:func:`helpers.scancheck.check_scan`); and, after it, a
        result without any psoas or quadratus lumborum voxel (not the lumbar region).
    fat_bright : bool
        With ``check_scan``: the model reads fat-bright images, so refuse a result whose fat
        around the predicted muscles is not bright (a fat-suppressed or water image), with
        :data:`SEGMENT_MIN_FAT_TO_BRIGHT`.  Off for a model trained on water images.
    """

    device: str = "auto"
    folds: tuple[int | str, ...] | None = None
    step_size: float | None = None
    mirror_tta: bool | None = None
    torch_resampling: bool | None = None
    fast: bool = False
    num_threads: int | None = None
    split_sides: bool = True
    configuration: str | None = None
    check_scan: bool = True
    fat_bright: bool = True

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            msg = f"must be auto, cpu, cuda or mps, got {self.device!r}"
            setting = "device"
            raise SettingError(setting, msg)
        if self.step_size is not None and not 0 < float(self.step_size) <= 1:
            msg = f"must lie in (0, 1], got {self.step_size!r}"
            setting = "step_size"
            raise SettingError(setting, msg)
        if self.num_threads is not None and int(self.num_threads) < 1:
            msg = f"must be at least 1, got {self.num_threads!r}"
            setting = "num_threads"
            raise SettingError(setting, msg)
        if self.folds is not None:
            if len(self.folds) == 0:
                msg = "must name at least one fold"
                setting = "folds"
                raise SettingError(setting, msg)
            for f in self.folds:
                if f != "all" and not (isinstance(f, int) and f >= 0):
                    msg = f"must be non-negative integers or 'all', got {f!r}"
                    setting = "folds"
                    raise SettingError(setting, msg)

    @classmethod
    def fast_preset(cls, **overrides: Any) -> SegmentSettings:
        """The ``fast`` preset: one fold, no mirror TTA, step :data:`FAST_STEP_SIZE`, torch
        resampling of the class scores."""
        return cls(fast=True, **overrides)

    @staticmethod
    def parse_folds(text: str | None) -> tuple[int | str, ...] | None:
        """Folds from the command-line form ``"0,1"`` (or ``"all"``)."""
        if text is None or not text.strip():
            return None
        out: list[int | str] = []
        for part in text.split(","):
            part = part.strip()
            if part == "all":
                out.append("all")
            elif part.isdigit():
                out.append(int(part))
            else:
                msg = f"--folds must be comma-separated fold numbers like 0,1 (or all), got {text!r}"
                raise ConfigError(msg)
        return tuple(out)


# ------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelInfo:
    """A usable nnU-Net model.

    Attributes
    ----------
    folder : Path
        The trained model folder (``dataset.json``, ``plans.json``, ``fold_K/``).
    source : Path
        What the user gave (zip or folder).
    sha256 : str
        sha256 of the zip, or of the folder's model files (see :func:`_folder_digest`).
    configuration, trainer, plans : str
        From the folder name ``<trainer>__<plans>__<configuration>`` and the checkpoint.
    folds : tuple
        Folds with a ``checkpoint_final.pth``.
    labels : LabelTable
        The model's output labels.
    n_channels : int
        Input channels the model expects.
    reader : str
        nnU-Net reader class of the model's plans.
    """

    folder: Path
    source: Path
    sha256: str
    configuration: str
    trainer: str
    plans: str
    folds: tuple[int | str, ...]
    labels: LabelTable
    n_channels: int
    reader: str

    @property
    def sided(self) -> bool:
        """True when every label of the model names a side."""
        return self.labels.is_sided()


#: Fat-suppression bars of the check after segmentation (:func:`helpers.fat.tissue_intensities`),
#: below measurement's 0.6 / 0.3, because a Dixon water + fat sum is segmented too (measured from
#: its pair): the Dixon phantom's sum passes, a phantom with its fat x 0.15 (23 % of the bright
#: level) is refused (``tests/test_scancheck.py``).
SEGMENT_MIN_FAT_TO_BRIGHT = 0.4
SEGMENT_MIN_SHELL_TO_BRIGHT = 0.2

_DATA = Path(__file__).resolve().parents[1] / "data"
#: Models shipped in ``data/``, usable by name wherever a model path is asked for.
BUNDLED_MODELS: dict[str, Path] = {
    "demo": _DATA / "demo_model" / "esma_demo_model.zip",
    "starter": _DATA / "starter_model" / "esma_starter_model.zip",
}


def resolve_model(model: str | Path) -> Path:
    """A bundled model's zip for its name (``demo``, ``starter``), else the path as given.

    Examples
    --------
    >>> resolve_model("starter").name
    'esma_starter_model.zip'
    >>> resolve_model("models/mine.zip")
    PosixPath('models/mine.zip')
    """
    text = str(model)
    return BUNDLED_MODELS[text] if text in BUNDLED_MODELS else Path(model)


def model_cache_dir() -> Path:
    """Folder where zipped models are unpacked: ``$ESMA_CACHE/models`` or ``~/.cache/esma/models``."""
    root = os.environ.get("ESMA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "esma"
    return base / "models"


def _expected_sha(zip_path: Path, expected: str | None) -> str | None:
    if expected:
        return expected.strip().lower()
    side = zip_path.with_name(zip_path.name + ".sha256")
    if side.is_file():
        text = side.read_text(encoding="utf-8").split()
        return text[0].strip().lower() if text else None
    return None


def install_model(zip_path: str | Path, expected_sha256: str | None = None) -> Path:
    """Unpack a model zip into the cache (once) and return the unpacked folder.

    Raises
    ------
    ModelError
        Missing file, checksum differing from ``expected_sha256`` (or ``<zip>.sha256``), not a
        zip, a member failing its CRC, or a member path escaping the folder.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise ModelError(zip_path, "model file not found")
    sha = sha256_file(zip_path)
    want = _expected_sha(zip_path, expected_sha256)
    if want and want != sha:
        msg = (f"checksum mismatch: sha256 is {sha}, expected {want} (the file is corrupt, "
               "truncated or a different model)")
        raise ModelError(zip_path, msg)
    target = model_cache_dir() / sha
    if (target / _INSTALL_MANIFEST).is_file():
        _verify_install(target, zip_path)
        return target
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(zip_path, f"not a readable zip archive ({exc})") from exc
    with zf:
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ModelError(zip_path, f"corrupt zip ({exc})") from exc
        if bad is not None:
            raise ModelError(zip_path, f"corrupt zip: member {bad} fails its CRC check")
        for name in zf.namelist():
            p = Path(name)
            if p.is_absolute() or ".." in p.parts:
                raise ModelError(zip_path, f"unsafe member path {name!r} in the zip")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.", dir=target.parent))
        try:
            zf.extractall(tmp)
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {
                "zip": zip_path.name,
                "zip_sha256": sha,
                "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
            }
            atomic_write_text(tmp / _INSTALL_MANIFEST, json.dumps(manifest, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("installed model %s into %s", zip_path.name, target)
    return target


def _verify_install(target: Path, zip_path: Path) -> None:
    """Check an unpacked model against its manifest; reinstall on mismatch."""
    manifest = json.loads((target / _INSTALL_MANIFEST).read_text(encoding="utf-8"))
    for rel, digest in manifest.get("files", {}).items():
        p = target / rel
        if not p.is_file() or sha256_file(p) != digest:
            log.warning("cached model %s changed on disk (%s); unpacking again", target, rel)
            (target / _INSTALL_MANIFEST).unlink(missing_ok=True)
            install_model(zip_path, manifest.get("zip_sha256"))
            return


def _folder_digest(folder: Path, folds: Sequence[int | str]) -> str:
    """sha256 over the model files of a folder (names and contents)."""
    import hashlib

    h = hashlib.sha256()
    names = ["dataset.json", "plans.json"] + [f"fold_{f}/checkpoint_final.pth" for f in folds]
    for name in names:
        h.update(name.encode())
        h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


def _find_trained_folders(root: Path) -> list[Path]:
    found = []
    for plans in sorted(root.rglob("plans.json")):
        d = plans.parent
        if (d / "dataset.json").is_file() and any(d.glob("fold_*")):
            found.append(d)
    return found


def labels_from_dataset_json(dataset_json: dict, where: Path) -> LabelTable:
    """Label table from nnU-Net ``dataset.json`` label names (side from the name, if any).

    ``multifidus_left``, ``left_multifidus``, ``Multifidus L`` are sided; ``psoas`` is unsided.

    Raises
    ------
    ModelError
        Region-based (overlapping) labels, which esma cannot turn into one label mask.
    """
    entries = []
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            raise ModelError(where, "region-based labels (overlapping regions) are not supported")
        if int(value) == 0 or name == "ignore":
            continue
        tokens = [t for t in re.split(r"[\s_\-]+", str(name).strip().lower()) if t]
        side = None
        if len(tokens) > 1 and tokens[-1] in _SIDES:
            side = _SIDES[tokens.pop()]
        elif len(tokens) > 1 and tokens[0] in _SIDES:
            side = _SIDES[tokens.pop(0)]
        entries.append({"value": int(value), "muscle": "_".join(tokens) or str(name),
                         "side": side})
    try:
        return parse_labels({"labels": entries}, where)
    except EsmaError as exc:
        raise ModelError(where, f"unusable labels in dataset.json ({exc})") from exc


def load_model(
    model: str | Path,
    expected_sha256: str | None = None,
    configuration: str | None = None,
) -> ModelInfo:
    """Locate, verify and describe a model given as a zip or a folder.

    Raises
    ------
    ModelError
        Missing, corrupt or incomplete model (no plans / dataset.json / checkpoint), several
        configurations without ``configuration``, unreadable labels or an unsupported reader.
    """
    source = Path(model)
    if not source.exists():
        raise ModelError(source, "model not found (give an exported .zip or a trained model folder)")
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise ModelError(source, "not a zip archive (give an exported .zip or a model folder)")
        root = install_model(source, expected_sha256)
        sha = sha256_file(source)
    else:
        root, sha = source, ""
    candidates = _find_trained_folders(root)
    if not candidates:
        msg = ("no nnU-Net model inside: expected <trainer>__<plans>__<configuration>/ with "
               "plans.json, dataset.json and fold_K/checkpoint_final.pth")
        raise ModelError(source, msg)
    if configuration is not None:
        candidates = [c for c in candidates if c.name.split("__")[-1] == configuration]
        if not candidates:
            raise ModelError(source, f"no trained configuration {configuration!r} inside")
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        msg = f"holds several trained configurations ({names}); choose one with configuration="
        raise ModelError(source, msg)
    folder = candidates[0]
    parts = folder.name.split("__")
    if len(parts) != 3:
        msg = f"model folder {folder.name!r} is not named <trainer>__<plans>__<configuration>"
        raise ModelError(source, msg)
    trainer, plans_name, config = parts
    folds: list[int | str] = []
    for d in sorted(folder.glob("fold_*")):
        tag = d.name.removeprefix("fold_")
        if (tag == "all" or tag.isdigit()) and (d / "checkpoint_final.pth").is_file():
            folds.append("all" if tag == "all" else int(tag))
    if not folds:
        raise ModelError(source, f"{folder.name} has no fold_K/checkpoint_final.pth")
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(source, f"unreadable dataset.json / plans.json ({exc})") from exc
    labels_path = folder / "labels.json"
    labels = (load_labels(labels_path) if labels_path.is_file()
              else labels_from_dataset_json(dataset_json, folder / "dataset.json"))
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in _SUPPORTED_READERS:
        msg = f"reader {reader} is not supported (esma maps {', '.join(_SUPPORTED_READERS)})"
        raise ModelError(source, msg)
    if config not in plans.get("configurations", {}):
        msg = f"configuration {config!r} (from the folder name) is not in plans.json"
        raise ModelError(source, msg)
    if not sha:
        sha = _folder_digest(folder, folds)
    return ModelInfo(folder=folder, source=source, sha256=sha, configuration=config,
                     trainer=trainer, plans=plans_name, folds=tuple(folds), labels=labels,
                     n_channels=len(channels), reader=reader)


# ------------------------------------------------------------------------------------ images
_MASK_NAME = re.compile(r"(_dseg|_mask|_seg|_label|_labels|_fatfrac)(\.nii(\.gz)?)$", re.IGNORECASE)


def find_images(path: str | Path) -> list[Path]:
    """Images to segment: the file itself, or every ``.nii``/``.nii.gz`` file in a folder.

    In a folder, BIDS-style ``*_T2w.nii(.gz)`` files are taken when there are any; otherwise all
    NIfTI files except masks (``*_dseg``, ``*_mask``, ``*_seg``, ``*_label(s)``, ``*_fatfrac``).

    Raises
    ------
    InputFileError
        Missing path, a folder without images, or two image files of one subject
        (``sub-01_T2w.nii.gz`` and ``sub-01.nii.gz``), naming both.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputFileError(path, "no such image file or folder")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")))
    t2w = [p for p in files if re.search(r"_T2w\.nii(\.gz)?$", p.name)]
    chosen = t2w or [p for p in files if not _MASK_NAME.search(p.name)]
    if not chosen:
        raise InputFileError(path, "folder holds no .nii/.nii.gz images")
    _refuse_two_files_per_subject(path, [p for p in files if not _MASK_NAME.search(p.name)])
    return chosen


def _refuse_two_files_per_subject(folder: Path, images: Sequence[Path]) -> None:
    """Raise when two image files of ``folder`` give the same subject ID (issue 16).

    Taking one of them silently (``_T2w`` first) could segment the wrong scan.
    """
    by_subject: dict[str, list[str]] = {}
    for image in images:
        by_subject.setdefault(subject_from_filename(image), []).append(image.name)
    clashes = {s: names for s, names in by_subject.items() if len(names) > 1}
    if clashes:
        subject, names = next(iter(sorted(clashes.items())))
        more = f" (and {len(clashes) - 1} more subjects)" if len(clashes) > 1 else ""
        msg = (
            f"{' and '.join(names)} are two images of subject {subject!r}{more}; "
            "keep one per subject (move or rename the other)"
        )
        raise InputFileError(folder, msg)


# ----------------------------------------------------------------------------------- runtime
def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        msg = "device 'cuda' requested but torch sees no CUDA GPU"
        raise ConfigError(msg)
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            msg = "device 'mps' requested but torch sees no Apple MPS device"
            raise ConfigError(msg)
    return device


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send nnU-Net's prints to the debug log instead of stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    text = buf.getvalue().strip()
    if text:
        log.debug("nnU-Net: %s", text)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _split_sides(mask: NDArray, affine: NDArray, labels: LabelTable) -> tuple[NDArray, LabelTable]:
    from helpers import labels as labels_module

    func = getattr(labels_module, "split_sides", None)
    if func is None:  # pragma: no cover - depends on the measurement-core issue
        msg = "helpers.labels.split_sides is not available: cannot split unsided labels"
        raise EsmaError(msg)
    return func(mask, affine, labels)


def side_check(mask: NDArray, affine: NDArray, labels: LabelTable) -> dict[str, str]:
    """For each muscle with both sides present: ``"ok"`` when its right label lies at larger
    world x (RAS+, the patient's right) than its left twin, else ``"swapped"``.

    Examples
    --------
    >>> m = np.zeros((4, 1, 1), int); m[0] = 2; m[3] = 1     # value 1 at high x
    >>> t = parse_labels({"labels": [{"value": 1, "muscle": "a", "side": "right"},
    ...                              {"value": 2, "muscle": "a", "side": "left"}]})
    >>> side_check(m, np.eye(4), t)
    {'a': 'ok'}
    """
    out: dict[str, str] = {}
    for muscle in labels.muscles:
        by_side: dict[str, Label] = {lab.side: lab for lab in labels.labels
                                     if lab.muscle == muscle and lab.side}
        if set(by_side) != {"left", "right"}:
            continue
        xs = {}
        for side, lab in by_side.items():
            idx = np.argwhere(mask == lab.value)
            if idx.size == 0:
                break
            centre = idx.mean(axis=0)
            xs[side] = float((affine[:3, :3] @ centre + affine[:3, 3])[0])
        if len(xs) == 2:
            out[muscle] = "ok" if xs["right"] > xs["left"] else "swapped"
    return out


class Segmenter:
    """One nnU-Net predictor for a model and settings, reused for every subject.

    Parameters
    ----------
    model : ModelInfo
        From :func:`load_model`.
    settings : SegmentSettings
        How to run.

    Raises
    ------
    ModelError
        The model cannot be loaded (unreadable checkpoint, trainer class unknown to nnU-Net,
        folds not present) or expects more than one input channel.
    """

    def __init__(self, model: ModelInfo, settings: SegmentSettings | None = None) -> None:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.model = model
        self.settings = settings = settings or SegmentSettings()
        if model.n_channels != 1:
            msg = (f"the model expects {model.n_channels} input channels per subject; esma "
                   "segment gives one image (channel _0000) per subject")
            raise ModelError(model.source, msg)
        self.device = _resolve_device(settings.device)
        self.threads = settings.num_threads or available_cores()
        if settings.folds is not None:
            missing = [f for f in settings.folds if f not in model.folds]
            if missing:
                have = ", ".join(str(f) for f in model.folds)
                raise ModelError(model.source, f"folds {missing} not in the model (it has {have})")
            folds = tuple(settings.folds)
        elif settings.fast:
            numbered = sorted(f for f in model.folds if f != "all")
            folds = (numbered[0] if numbered else "all",)
        else:
            folds = model.folds
        step = settings.step_size if settings.step_size is not None else (
            FAST_STEP_SIZE if settings.fast else 0.5)
        mirror = settings.mirror_tta if settings.mirror_tta is not None else not settings.fast
        self.mirror_note = ""
        if mirror and model.sided:
            log.warning("model %s has sided labels: mirror test-time augmentation is turned "
                        "off (mirroring swaps left and right)", model.folder.name)
            mirror = False
            self.mirror_note = "forced off: the model's labels are sided"
        self.folds, self.step_size, self.requested_mirror = folds, float(step), bool(mirror)
        with _quiet():
            predictor = nnUNetPredictor(
                tile_step_size=self.step_size, use_gaussian=True, use_mirroring=self.requested_mirror,
                perform_everything_on_device=self.device == "cuda",
                device=torch.device(self.device), verbose=False, verbose_preprocessing=False,
                allow_tqdm=False,
            )
            try:
                with _torch_threads(self.threads):
                    _initialize(predictor, model, folds)
            except ModelError:
                raise
            except Exception as exc:
                msg = f"nnU-Net cannot load the model ({type(exc).__name__}: {exc})"
                raise ModelError(model.source, msg) from exc
        torch_resampling = (settings.torch_resampling if settings.torch_resampling is not None
                            else settings.fast)
        if torch_resampling:
            _use_torch_resampling(predictor, self.threads)
        self.torch_resampling = bool(torch_resampling)
        self.predictor = predictor
        axes = predictor.allowed_mirroring_axes
        #: Mirror TTA actually run (requested and allowed by the model's training).
        self.mirror_tta = bool(self.requested_mirror and axes)
        if self.requested_mirror and not axes:
            self.mirror_note = "no effect: the model was trained without mirroring"
        self.reader = predictor.plans_manager.image_reader_writer_class()
        self.will_split = bool(settings.split_sides and not model.sided)
        #: Warnings about the last image predicted (also written to its sidecar).
        self.warnings: list[str] = []

    # ------------------------------------------------------------------------------ describe
    def settings_record(self) -> dict[str, Any]:
        """The effective settings (what the completion marker and the sidecar record)."""
        return {
            "device": self.device,
            "folds": [str(f) for f in self.folds],
            "step_size": self.step_size,
            "mirror_tta": self.mirror_tta,
            "mirror_tta_note": self.mirror_note,
            "fast_preset": bool(self.settings.fast),
            "torch_resampling": self.torch_resampling,
            "split_sides": self.will_split,
            "configuration": self.model.configuration,
            "check_scan": bool(self.settings.check_scan),
            "fat_bright": bool(self.settings.fat_bright),
        }

    # ------------------------------------------------------------------------------- predict
    def predict_raw(self, image_path: str | Path) -> tuple[NDArray, Volume]:
        """The model's label array on the image file's own grid (no side split).

        Raises
        ------
        InputFileError
            The image is unreadable (by nibabel or by the model's nnU-Net reader) or unusable.
        """
        from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        image_path = Path(image_path)
        volume = load_image(image_path)
        if self.settings.check_scan:
            from helpers.scancheck import check_scan

            check_scan(volume)
        try:
            with _quiet():
                data, props = self.reader.read_images([str(image_path)])
        except Exception as exc:
            msg = f"nnU-Net's {self.model.reader} cannot read it ({type(exc).__name__}: {exc})"
            raise InputFileError(image_path, msg) from exc
        if data.ndim != 4 or data.shape[0] != 1:
            msg = f"expected one 3-D image, nnU-Net read an array of shape {data.shape}"
            raise InputFileError(image_path, msg)
        self.warnings = self._slice_axis_warnings(volume, image_path)
        to_file = self._file_order_mapper(props)
        if not _same_values(to_file(data[0]), volume.data):
            msg = ("could not map nnU-Net's array order back onto the file's grid "
                   f"({self.model.reader}); refusing to write a misplaced mask")
            raise InputFileError(image_path, msg)
        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        with _quiet(), _torch_threads(self.threads if self.device == "cpu" else None):
            ppa = PreprocessAdapterFromNpy([data], [None], [props], [None], pm,
                                           self.predictor.dataset_json, cm,
                                           num_threads_in_multithreaded=1, verbose=False)
            item = next(ppa)
            logits = self.predictor.predict_logits_from_preprocessed_data(item["data"]).cpu()
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, pm, cm, self.predictor.label_manager, item["data_properties"], False,
                num_threads_torch=self.threads,
            )
        del logits, item, data
        mask = np.ascontiguousarray(to_file(np.asarray(seg)))
        if mask.shape != volume.data.shape:  # pragma: no cover - guarded by the check above
            msg = f"prediction shape {mask.shape} differs from the image {volume.data.shape}"
            raise InputFileError(image_path, msg)
        return mask, volume

    def predict(self, image_path: str | Path) -> tuple[NDArray, Volume, LabelTable]:
        """Label array on the image's grid, the image, and the labels of the array.

        Unsided models get sides by anatomy when ``split_sides`` (the default).
        """
        mask, volume = self.predict_raw(image_path)
        labels = self.model.labels
        lumbar = [lab.value for lab in labels.labels
                  if lab.muscle in ("psoas_major", "quadratus_lumborum")]
        if self.settings.check_scan and lumbar and not np.isin(mask, lumbar).any():
            msg = ("the model found no psoas major or quadratus lumborum on any slice: not the "
                   "lumbar region, or a scan this model cannot read; no mask written")
            raise InputFileError(Path(image_path), msg)
        if self.settings.check_scan and self.settings.fat_bright and lumbar:
            from helpers.fat import tissue_intensities

            # Fat around the predicted muscles must be brighter than they are and among the
            # body's bright tissues; raises InputFileError naming the file otherwise.
            tissue_intensities(volume.data, mask > 0, volume.affine, path=image_path,
                               min_fat_to_bright=SEGMENT_MIN_FAT_TO_BRIGHT,
                               min_shell_to_bright=SEGMENT_MIN_SHELL_TO_BRIGHT,
                               min_fat_to_muscle=1.0)
        if self.will_split:
            mask, labels = _split_sides(mask, volume.affine, labels)
        return np.asarray(mask), volume, labels

    def _slice_axis_warnings(self, volume: Volume, image_path: Path) -> list[str]:
        """A 2d model slices along one array axis; warn when that is not the axial one."""
        cm = self.predictor.configuration_manager
        if len(cm.patch_size) != 2 or self.model.reader == "NibabelIOWithReorient":
            return []
        model_axis = int(self.predictor.plans_manager.transpose_forward[0])  # reader order
        axial = 2 - slice_axis(volume.affine)  # reader (z, y, x) order of the file's axial axis
        if model_axis == axial:
            return []
        msg = (f"{image_path.name}: the 2d model slices along array axis {2 - model_axis} but "
               f"this image's axial axis is {2 - axial}; check the result")
        log.warning(msg)
        return [msg]

    def _file_order_mapper(self, props: dict) -> Any:
        """Function taking a reader-order (z, y, x) array to the file's (nibabel) array order."""
        if self.model.reader in ("SimpleITKIO", "NibabelIO"):
            return lambda a: np.asarray(a).transpose(2, 1, 0)
        # NibabelIOWithReorient: RAS-canonical array, transposed; undo both.
        import nibabel as nib

        stuff = props["nibabel_stuff"]
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(stuff["reoriented_affine"]),
            nib.orientations.io_orientation(stuff["original_affine"]),
        )
        return lambda a: nib.orientations.apply_orientation(np.asarray(a).transpose(2, 1, 0), ornt)


def _use_torch_resampling(predictor: Any, threads: int) -> None:
    """Resample the class scores with nnU-Net's ``resample_torch_fornnunet`` (bilinear)."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    conf = dict(predictor.configuration_manager.configuration)
    conf["resampling_fn_probabilities"] = "resample_torch_fornnunet"
    conf["resampling_fn_probabilities_kwargs"] = {"is_seg": False, "num_threads": int(threads)}
    predictor.configuration_manager = ConfigurationManager(conf)


#: Built-in trainers that build their network as ``nnUNetTrainer`` does (from the plans, with
#: ``get_network_from_plans``).  For these :func:`_initialize` builds it directly: importing a
#: trainer module costs about 2 s of start-up (its logger imports matplotlib and seaborn), a
#: third of ``esma segment --fast`` on a 10-volume cohort.  A test checks each name against
#: nnU-Net's class.
PLAN_NETWORK_TRAINERS = frozenset({"nnUNetTrainer", "nnUNetTrainerNoMirroring"})


def _initialize(predictor: Any, model: ModelInfo, folds: Sequence[int | str]) -> None:
    """``nnUNetPredictor.initialize_from_trained_model_folder`` with esma's trainer lookup.

    Same steps and result (load each fold's weights, build the network with the checkpoint's
    trainer class, load the first fold's weights, :meth:`manual_initialization`), but the class
    comes from :func:`helpers.nnunet_runtime.find_trainer_class`, which does not crash on installs
    where nnU-Net's own search would import torchvision; and the trainers of
    :data:`PLAN_NETWORK_TRAINERS` build the network from the plans without importing a trainer.
    """
    import torch
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


    dataset_json = json.loads((model.folder / "dataset.json").read_text(encoding="utf-8"))
    plans = json.loads((model.folder / "plans.json").read_text(encoding="utf-8"))
    plans_manager = PlansManager(plans)
    parameters = []
    for i, fold in enumerate(folds):
        path = model.folder / f"fold_{fold}" / "checkpoint_final.pth"
        try:
            checkpoint = torch.load(path, map_location=torch.device("cpu"), weights_only=False)
            weights = checkpoint["network_weights"]
        except Exception as exc:
            msg = f"fold_{fold}/checkpoint_final.pth is unreadable ({type(exc).__name__}: {exc})"
            raise ModelError(model.source, msg) from exc
        if i == 0:
            trainer_name = checkpoint["trainer_name"]
            configuration_name = checkpoint["init_args"]["configuration"]
            mirror_axes = checkpoint.get("inference_allowed_mirroring_axes")
        parameters.append(weights)
    configuration_manager = plans_manager.get_configuration(configuration_name)
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if trainer_name in PLAN_NETWORK_TRAINERS:
        # nnUNetTrainer.build_network_architecture, without importing the trainer module
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        network = get_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            n_in, n_out, allow_init=True, deep_supervision=False)
    else:
        network = find_trainer_class(trainer_name).build_network_architecture(
            plans_manager, configuration_manager, n_in, n_out, enable_deep_supervision=False)
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters,
                                    dataset_json, trainer_name, mirror_axes)


def _same_values(a: NDArray, b: NDArray) -> bool:
    if a.shape != b.shape:
        return False
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(b))))
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-5 * scale))


# ------------------------------------------------------------------------------------ cohort
_COLUMNS = ["subject", "image", "mask", "status", "error", "seconds"]


def segment_cohort(
    images: Sequence[str | Path],
    model: str | Path | ModelInfo,
    out_dir: str | Path,
    settings: SegmentSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    expected_sha256: str | None = None,
) -> pd.DataFrame:
    """Segment images one at a time; one row per image.

    Parameters
    ----------
    images : sequence of path
        Image files (see :func:`find_images` to list a folder).
    model : path or ModelInfo
        Exported zip or trained model folder (or an already loaded :class:`ModelInfo`).
    out_dir : path
        Receives ``<subject>.nii.gz``, ``<subject>.json`` (sidecar) and ``labels.json``.
    settings : SegmentSettings, optional
        Default: nnU-Net's defaults on the best available device.
    overwrite : bool
        Redo subjects already done with the same model, settings and input.
    progress : bool
        Show a tqdm progress bar.
    expected_sha256 : str, optional
        Refuse a zip whose sha256 differs.

    Returns
    -------
    DataFrame
        Columns ``subject, image, mask, status, error, seconds``; ``status`` is ``done``,
        ``skipped`` (already done) or ``failed`` (``error`` names the file and the problem).

    Raises
    ------
    ModelError
        The model is unusable (nothing is segmented).
    """
    from tqdm.auto import tqdm

    settings = settings or SegmentSettings()
    info = model if isinstance(model, ModelInfo) else load_model(
        model, expected_sha256, settings.configuration)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter(info, settings)
    record = segmenter.settings_record()
    log.info("segmenting %d images with %s (%s)", len(images), info.folder.name,
             ", ".join(f"{k}={v}" for k, v in record.items() if k != "mirror_tta_note"))
    rows: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    labels_written = False
    for image in tqdm([Path(p) for p in images], desc="segment", unit="scan", disable=not progress):
        subject = subject_from_filename(image)
        target = out_dir / f"{subject}.nii.gz"
        row: dict[str, Any] = {"subject": subject, "image": str(image), "mask": str(target),
                               "status": "failed", "error": "", "seconds": 0.0}
        t0 = time.perf_counter()
        try:
            if subject == "labels":
                raise InputFileError(image, "subject ID 'labels' would overwrite labels.json")
            if subject in seen:
                msg = f"subject ID {subject!r} also comes from {seen[subject].name}"
                raise InputFileError(image, msg)
            seen[subject] = image
            if not image.is_file():
                raise InputFileError(image, "file not found")
            done_key = {"model_sha256": info.sha256, "image_sha256": sha256_file(image), **record}
            if not overwrite and is_done(target, done_key):
                row["status"] = "skipped"
            else:
                mask, volume, labels = segmenter.predict(image)
                save_like(mask.astype(np.uint8 if int(mask.max(initial=0)) < 256 else np.int16),
                          volume, target)
                seconds = time.perf_counter() - t0
                sidecar = _sidecar(subject, image, target, info, record, labels, seconds,
                                   side_check(mask, volume.affine, labels), done_key,
                                   segmenter.warnings)
                atomic_write_text(out_dir / f"{subject}.json", json.dumps(sidecar, indent=2) + "\n")
                mark_done(target, done_key)
                if not labels_written:
                    _write_labels(out_dir, labels)
                    labels_written = True
                row["status"] = "done"
        except (KeyboardInterrupt, SystemExit):
            raise
        except EsmaError as exc:
            row["error"] = str(exc)
            log.error("%s", exc)
        except Exception as exc:  # one bad scan never stops the cohort
            row["error"] = f"{image}: {type(exc).__name__}: {exc}"
            log.exception("segmentation of %s failed", image)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
    if not labels_written and not (out_dir / "labels.json").is_file():
        _labels_from_sidecars(out_dir, [r["subject"] for r in rows if r["status"] == "skipped"])
    return pd.DataFrame(rows, columns=_COLUMNS)


def _labels_from_sidecars(out_dir: Path, subjects: Sequence[str]) -> None:
    """Restore ``labels.json`` from a sidecar when every subject was skipped."""
    for subject in subjects:
        with contextlib.suppress(OSError, ValueError, EsmaError):
            doc = json.loads((out_dir / f"{subject}.json").read_text(encoding="utf-8"))
            _write_labels(out_dir, parse_labels({"labels": doc["labels"]}))
            return


def _write_labels(out_dir: Path, labels: LabelTable) -> None:
    doc = {"labels": [{"value": lab.value, "muscle": lab.muscle, "side": lab.side}
                      for lab in labels.labels]}
    atomic_write_text(out_dir / "labels.json", json.dumps(doc, indent=2) + "\n")


def _sidecar(
    subject: str, image: Path, target: Path, info: ModelInfo, record: dict[str, Any],
    labels: LabelTable, seconds: float, sides: dict[str, str], done_key: dict[str, Any],
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    notes = list(warnings)
    swapped = sorted(m for m, s in sides.items() if s != "ok")
    if swapped:
        msg = (f"{subject}: right label lies left of its twin for {', '.join(swapped)} "
               "(check the image orientation or the model)")
        log.warning(msg)
        notes.append(msg)
    return {
        "subject": subject,
        "image": image.name,
        "image_sha256": done_key["image_sha256"],
        "mask": target.name,
        "model": {
            "sha256": info.sha256,
            "source": info.source.name,
            "folder": f"{info.folder.parent.name}/{info.folder.name}",
            "configuration": info.configuration,
            "trainer": info.trainer,
            "plans": info.plans,
            "labels_sided": info.sided,
        },
        "settings": record,
        "versions": runtime_versions(),
        "labels": [{"value": lab.value, "muscle": lab.muscle, "side": lab.side}
                   for lab in labels.labels],
        "side_check": sides,
        "warnings": notes,
        "seconds": round(seconds, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
