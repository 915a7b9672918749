"""Train and package nnU-Net v2 models for esma.

The chain a group with its own manual tracings runs (``data/demo_model/TRAINING.md`` walks
through it)::

    cases = [TrainingCase("c01", Path("c01_T2w.nii.gz"), Path("c01_dseg.nii.gz")), ...]
    result = train_model(cases, Path("labels.json"), work_dir=Path("work"),
                         out_zip=Path("my_model.zip"), settings=TrainSettings())

1. :func:`check_training_cases` reads every image/mask pair and reports *all* geometry and label
   problems at once (nnU-Net does not reorient: image and mask must share the voxel grid).
2. :func:`write_raw_dataset` writes an nnU-Net raw dataset (``imagesTr/<case>_0000.nii.gz``,
   ``labelsTr/<case>.nii.gz``, ``dataset.json``) with a dataset ID outside 001-010 (taken by the
   Medical Segmentation Decathlon).
3. :func:`plan_and_preprocess` runs nnU-Net's fingerprint, planner and preprocessor; with a
   :class:`SmallNetwork` it rewrites the 2d plans first (coarser in-plane spacing, fewer
   features) so that a model trains on a laptop CPU.
4. :func:`train_fold` trains one fold with a **built-in** nnU-Net trainer class
   (``nnUNetTrainer``, or ``nnUNetTrainerNoMirroring`` when the labels are sided, because
   mirroring swaps left and right).  Epochs, iterations and learning rate are set on the trainer
   *instance* rather than in a subclass, so the checkpoint names a class nnU-Net finds by
   itself: both ``esma segment`` and ``nnUNetv2_predict_from_modelfolder`` load the model
   without ``nnUNet_extTrainer``.
5. :func:`export_model` writes a zip in nnU-Net's export layout (``nnUNetv2_install_pretrained_
   model_from_zip`` accepts it) plus esma's ``labels.json`` and ``esma_model.json`` beside the
   model's ``dataset.json``.  Optimizer state is stripped from the checkpoints (inference does
   not use it), which halves the size.

nnU-Net's folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) are passed per
call through the environment of a child process (or a temporary ``os.environ`` patch for the
cheap in-process export), never set globally.  Heavy steps run in a child Python process: a
crash or an out-of-memory kill there is reported as an error and cannot take down a notebook
kernel, and nnU-Net's worker pools never start inside Jupyter.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.errors import (
    ConfigError,
    EsmaError,
    GeometryMismatchError,
    InputFileError,
    LabelError,
    ModelError,
)
from helpers.files import atomic_path, atomic_write_text
from helpers.labels import LabelTable, load_labels
from helpers.nifti import check_same_grid, load_image, load_mask, save_like, subject_from_filename
from helpers.nnunet_runtime import available_cores, find_trainer_class, runtime_versions
from helpers.overlap import dice_per_label

__all__ = [
    "ESMA_MODEL_FILE",
    "LABELS_FILE",
    "NnunetDirs",
    "SmallNetwork",
    "TrainResult",
    "TrainSettings",
    "TrainingCase",
    "check_training_cases",
    "dataset_json_labels",
    "evaluate_masks",
    "export_model",
    "labels_document",
    "make_untrained_model",
    "pair_cases",
    "plan_and_preprocess",
    "train_fold",
    "train_model",
    "write_raw_dataset",
]

log = logging.getLogger(__name__)

#: esma's label file inside a model folder / zip (MuscleMap shape, see helpers.labels).
LABELS_FILE = "labels.json"
#: esma's model metadata inside a model folder / zip.
ESMA_MODEL_FILE = "esma_model.json"
MODEL_FORMAT = "esma-nnunetv2-model/1"

_TRAINER_DEFAULT = "nnUNetTrainer"
_TRAINER_SIDED = "nnUNetTrainerNoMirroring"


# --------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrainingCase:
    """One labelled training scan.

    Attributes
    ----------
    case_id : str
        Unique ID (letters, digits, ``-`` and ``_``); becomes the nnU-Net case name.
    image : Path
        The image (.nii / .nii.gz).
    mask : Path
        Its label mask on the same voxel grid.
    """

    case_id: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class SmallNetwork:
    """A reduced 2d U-Net for CPU training (applied by editing the planned 2d configuration).

    Attributes
    ----------
    spacing_mm : float
        In-plane target spacing (mm).  Coarser than the scans (e.g. 1.875 mm for 0.94 mm scans)
        cuts the work per slice four-fold; predictions are resampled back to the input grid as
        probabilities, so boundaries stay sub-voxel smooth.
    features : tuple of int
        Feature maps per resolution stage (its length is the number of stages).
    batch_size : int
        Slices per training batch.
    patch_size : tuple of int, optional
        In-plane patch (voxels, each a multiple of ``2 ** (stages - 1)``); default: the median
        image size at ``spacing_mm``, rounded up.
    plans_name : str
        Plans identifier of the edited plans.
    """

    spacing_mm: float = 1.875
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    batch_size: int = 16
    patch_size: tuple[int, int] | None = None
    plans_name: str = "esmaSmallPlans"


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`train_model` trains.

    The defaults are nnU-Net's own training schedule (1000 epochs x 250 iterations, 5-fold
    cross-validation) on the ``2d`` configuration, which suits thick-slice axial T2.  For a GPU
    study keep them; for a CPU trial pass a :class:`SmallNetwork` and a short schedule.

    Attributes
    ----------
    dataset_id : int
        nnU-Net dataset ID, 11-999 (001-010 belong to the Decathlon).
    dataset_name : str
        Short name (letters, digits, ``_``), e.g. ``"LumbarMuscles"``.
    configuration : str
        nnU-Net configuration, always named explicitly (``"2d"``, ``"3d_fullres"``).
    folds : tuple
        Folds to train (``0``-``4`` or ``"all"``).
    validation_cases : tuple of str, optional
        Case IDs held out as the validation set of a single split (fold 0) instead of nnU-Net's
        5-fold cross-validation.
    trainer : str, optional
        Built-in nnU-Net trainer class; default ``nnUNetTrainerNoMirroring`` for sided labels
        (mirroring swaps left and right), else ``nnUNetTrainer``.
    planner : str
        nnU-Net experiment planner class (``ExperimentPlanner`` gives the ``nnUNetPlans``).
    small_network : SmallNetwork, optional
        Shrink the 2d network for CPU training.
    epochs, iterations_per_epoch, val_iterations_per_epoch : int
        Training length.
    initial_lr : float
        Initial learning rate (poly schedule to zero over the epochs).
    rotation_deg : float, optional
        Largest in-plane rotation of the training augmentation (degrees); default nnU-Net's
        (+-180 for square 2d patches).  Training only: inference is unchanged.
    device : {"auto", "cpu", "cuda", "mps"}
        Training device.
    num_threads : int, optional
        Torch threads of the training process (default: all cores).
    da_workers : int, optional
        Data-augmentation worker processes (default: nnU-Net's choice capped by the cores).
    preprocess_workers : int
        Processes for fingerprinting and preprocessing.
    reader : {"SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"}
        nnU-Net image reader of the model.  ``NibabelIOWithReorient`` re-stores every image
        RAS-canonical before the network sees it, in training and at inference, so the model
        is independent of the storage orientation.
    resume : bool
        Continue an interrupted run in the same ``work_dir``: the raw dataset and the
        preprocessed data are reused when the cases and settings are unchanged, and a fold
        restarts from its latest checkpoint (saved every ``save_every`` epochs).
    save_every : int, optional
        Epochs between checkpoints (default: a quarter of the epochs, at most 50).
    seed : int
        Seeds torch and numpy in the training process (augmentation workers are not seeded:
        nnU-Net training is not bit-reproducible).
    init_from : str, optional
        A parent model (exported zip or trained folder) to fine-tune: its plans (network,
        spacing, normalisation) are used instead of new ones and its fold weights initialise
        the training (nnU-Net's ``pretrained_weights``).  Its labels must equal the cases'.
    ignore_label : bool
        The masks may hold one more value than the label file declares (``N + 1``): voxels
        whose label is unknown (partly labelled cases, e.g. a label map that merges two of
        the muscles).  nnU-Net's ``ignore`` label: they add nothing to the loss, and the
        model never predicts them.
    """

    dataset_id: int = 501
    dataset_name: str = "EsmaMuscles"
    configuration: str = "2d"
    folds: tuple[int | str, ...] = (0, 1, 2, 3, 4)
    validation_cases: tuple[str, ...] | None = None
    trainer: str | None = None
    planner: str = "ExperimentPlanner"
    small_network: SmallNetwork | None = None
    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    initial_lr: float = 1e-2
    rotation_deg: float | None = None
    device: str = "auto"
    num_threads: int | None = None
    da_workers: int | None = None
    preprocess_workers: int = 2
    reader: str = "SimpleITKIO"
    resume: bool = False
    save_every: int | None = None
    seed: int = 12345
    init_from: str | None = None
    ignore_label: bool = False

    def __post_init__(self) -> None:
        if not 11 <= int(self.dataset_id) <= 999:
            msg = f"dataset_id must lie in 11-999 (001-010 belong to the Decathlon), got {self.dataset_id}"
            raise ConfigError(msg)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.dataset_name):
            msg = f"dataset_name must be letters, digits and '_', got {self.dataset_name!r}"
            raise ConfigError(msg)
        if not self.folds:
            msg = "folds must name at least one fold"
            raise ConfigError(msg)
        for f in self.folds:
            if f != "all" and not (isinstance(f, int) and 0 <= f <= 4):
                msg = f"folds must be 0-4 or 'all', got {f!r}"
                raise ConfigError(msg)
        if self.validation_cases is not None and tuple(self.folds) != (0,):
            msg = "validation_cases defines one split: train folds=(0,) with it"
            raise ConfigError(msg)
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            msg = f"device must be auto, cpu, cuda or mps, got {self.device!r}"
            raise ConfigError(msg)
        for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
            if int(getattr(self, name)) < 1:
                msg = f"{name} must be at least 1, got {getattr(self, name)!r}"
                raise ConfigError(msg)
        if self.reader not in ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"):
            msg = ("reader must be SimpleITKIO, NibabelIO or NibabelIOWithReorient, "
                   f"got {self.reader!r}")
            raise ConfigError(msg)
        if self.save_every is not None and int(self.save_every) < 1:
            msg = f"save_every must be at least 1, got {self.save_every!r}"
            raise ConfigError(msg)
        if self.init_from is not None and self.small_network is not None:
            msg = "init_from fine-tunes the parent model's own network: drop small_network"
            raise ConfigError(msg)
        if self.small_network is not None and self.configuration != "2d":
            msg = "small_network shrinks the 2d configuration: use configuration='2d'"
            raise ConfigError(msg)

    @property
    def dataset_folder_name(self) -> str:
        """nnU-Net's dataset folder name, ``DatasetXXX_Name``."""
        return f"Dataset{int(self.dataset_id):03d}_{self.dataset_name}"


@dataclass(frozen=True)
class NnunetDirs:
    """The three nnU-Net folders of one training run (under ``root``)."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def env(self) -> dict[str, str]:
        """Environment variables naming the folders."""
        return {
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
        }

    def make(self) -> NnunetDirs:
        for p in (self.raw, self.preprocessed, self.results):
            p.mkdir(parents=True, exist_ok=True)
        return self


@dataclass
class TrainResult:
    """What :func:`train_model` produced."""

    model_zip: Path
    model_folder: Path
    validation: pd.DataFrame
    seconds: float
    cpu_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------- utilities
@contextlib.contextmanager
def _patched_env(values: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (nnU-Net reads its folders lazily from them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def labels_document(labels: LabelTable) -> dict[str, Any]:
    """The MuscleMap-shaped JSON document of a label table."""
    return {
        "labels": [
            {"value": lab.value, "muscle": lab.muscle, "side": lab.side} for lab in labels.labels
        ]
    }


def dataset_json_labels(labels: LabelTable, ignore: bool = False) -> dict[str, int]:
    """nnU-Net ``dataset.json`` labels (``background: 0`` then ``muscle[_side]: value``).

    With ``ignore``, ``ignore: N + 1`` follows (nnU-Net's label for unknown voxels, which must
    be the highest value).

    Raises
    ------
    LabelError
        Values not consecutive from 1 (nnU-Net requires ``0..N``).
    """
    values = sorted(labels.values)
    if values != list(range(1, len(values) + 1)):
        where = labels.path or Path("<labels>")
        msg = f"nnU-Net needs label values 1..N without gaps; the label file declares {values}"
        raise LabelError(where, msg)
    out = {"background": 0}
    for lab in sorted(labels.labels, key=lambda x: x.value):
        out[f"{lab.muscle}_{lab.side}" if lab.side else lab.muscle] = lab.value
    if ignore:
        out["ignore"] = ignore_value(labels)
    return out


def ignore_value(labels: LabelTable) -> int:
    """The mask value of unknown voxels with ``TrainSettings.ignore_label``: one above the
    declared labels (nnU-Net requires its ignore label to be the highest value)."""
    return len(labels.values) + 1


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------------------- raw dataset
_MASK_TAGS = ("_dseg", "_mask", "_seg", "_labels", "_label")


def _mask_subject(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for tag in _MASK_TAGS:
        if name.endswith(tag):
            name = name[: -len(tag)]
            break
    return subject_from_filename(name + ".nii.gz")


def pair_cases(images: str | Path, masks: str | Path) -> list[TrainingCase]:
    """Pair every image of a folder with its mask by subject ID.

    Images are found like ``esma segment`` finds them (:func:`helpers.segment.find_images`); a
    mask belongs to subject ``S`` when its name, without ``.nii(.gz)``, a ``_dseg`` / ``_mask``
    / ``_seg`` / ``_label(s)`` tag, ``_0000`` and ``_T2w``, is ``S`` (``S_T2w_dseg.nii.gz``,
    ``S_dseg.nii.gz`` and ``S.nii.gz`` all work).

    Raises
    ------
    InputFileError
        A folder is missing, or images without a mask (all listed).
    """
    from helpers.segment import find_images

    image_files = find_images(images)
    masks = Path(masks)
    if not masks.is_dir():
        raise InputFileError(masks, "mask folder not found")
    by_subject: dict[str, Path] = {}
    for p in sorted(masks.iterdir()):
        if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")) and p not in image_files:
            by_subject.setdefault(_mask_subject(p), p)
    cases, missing = [], []
    for img in image_files:
        subject = subject_from_filename(img)
        if subject in by_subject:
            cases.append(TrainingCase(subject, img, by_subject[subject]))
        else:
            missing.append(img.name)
    if missing:
        msg = f"no mask found for {len(missing)} image(s): {', '.join(missing)}"
        raise InputFileError(masks, msg)
    return cases


def check_training_cases(cases: Sequence[TrainingCase], labels: LabelTable,
                         ignore: bool = False) -> None:
    """Check every image/mask pair before nnU-Net sees them; report all problems at once.

    Checks: IDs unique and well-formed, files readable, image and mask on the same grid
    (shape and affine within :data:`helpers.nifti.AFFINE_TOLERANCE_MM`), mask values declared
    by the label file (plus ``N + 1``, unknown, with ``ignore``).

    Raises
    ------
    GeometryMismatchError
        One or more pairs do not share the voxel grid (message lists every such pair).
    InputFileError, LabelError
        Other problems, listed one per line, naming each file.
    ConfigError
        No cases, or duplicate / malformed case IDs.
    """
    if not cases:
        msg = "no training cases given"
        raise ConfigError(msg)
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        msg = f"training case IDs are not unique: {dupes}"
        raise ConfigError(msg)
    bad = [i for i in ids if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", i)]
    if bad:
        msg = f"training case IDs must be letters, digits, '-' and '_': {bad}"
        raise ConfigError(msg)
    geometry: list[str] = []
    other: list[EsmaError] = []
    for case in cases:
        try:
            image = load_image(case.image)
            mask = load_mask(case.mask)
        except EsmaError as exc:
            other.append(exc)
            continue
        try:
            check_same_grid(image, mask)
        except GeometryMismatchError as exc:
            geometry.append(f"  {case.case_id}: {exc}")
            continue
        try:
            present = set(map(int, np.unique(mask.data)))
            if ignore:
                present.discard(ignore_value(labels))
            labels.check_values(present, case.mask)
        except LabelError as exc:
            other.append(exc)
    if geometry:
        msg = (
            f"{len(geometry)} of {len(cases)} image/mask pairs are not on the same voxel grid "
            "(nnU-Net does not reorient or resample masks; re-export the masks on their image "
            "grid):\n" + "\n".join(geometry)
        )
        first = next(c for c in cases if f"  {c.case_id}:" in geometry[0])
        raise GeometryMismatchError(first.mask, msg)
    if other:
        if len(other) == 1:
            raise other[0]
        lines = "\n".join(f"  {e}" for e in other)
        first_path = getattr(other[0], "path", Path("<cases>"))
        raise InputFileError(first_path, f"{len(other)} training files are unusable:\n{lines}")


def write_raw_dataset(
    cases: Sequence[TrainingCase],
    labels: LabelTable,
    dirs: NnunetDirs,
    settings: TrainSettings,
) -> Path:
    """Write the nnU-Net raw dataset of ``cases``; return its folder.

    Images are re-written as float32 and masks as uint8 on the image's own affine (qform and
    sform both set), so nnU-Net's SimpleITK reader sees identical geometry for the pair.  An
    existing dataset folder of the same ID is replaced.
    """
    check_training_cases(cases, labels, settings.ignore_label)
    ds_labels = dataset_json_labels(labels, settings.ignore_label)
    folder = dirs.make().raw / settings.dataset_folder_name
    for old in dirs.raw.glob(f"Dataset{int(settings.dataset_id):03d}_*"):
        shutil.rmtree(old)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    for case in cases:
        image = load_image(case.image)
        mask = load_mask(case.mask)
        save_like(image.data, image, folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        save_like(mask.data.astype(np.uint8), image, folder / "labelsTr" / f"{case.case_id}.nii.gz")
    dataset = {
        "channel_names": {"0": "T2"},
        "labels": ds_labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": settings.dataset_name,
        "description": "paraspinal muscle masks converted by esma (helpers.training)",
        "converted_by": "esma",
    }
    if settings.reader != "SimpleITKIO":
        dataset["overwrite_image_reader_writer"] = settings.reader
    atomic_write_text(folder / "dataset.json", json.dumps(dataset, indent=2) + "\n")
    atomic_write_text(folder / LABELS_FILE, json.dumps(labels_document(labels), indent=2) + "\n")
    log.info("wrote nnU-Net raw dataset %s (%d cases)", folder, len(cases))
    return folder


# ----------------------------------------------------------------- child-process worker
def _run_worker(step: str, config: Mapping[str, Any], env: Mapping[str, str], log_path: Path) -> None:
    """Run ``_worker_main(step, config)`` in a child Python; raise with the log tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = log_path.with_suffix(".json")
    atomic_write_text(cfg_path, json.dumps(dict(config), indent=2, default=str))
    child_env = dict(os.environ)
    child_env.update(env)
    child_env["PYTHONUNBUFFERED"] = "1"
    code = "import sys; from helpers.training import _worker_main; _worker_main(sys.argv[1], sys.argv[2])"
    cmd = [sys.executable, "-c", code, step, str(cfg_path)]
    log.info("nnU-Net %s: running in a child process (log: %s)", step, log_path)
    with log_path.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env, text=True
        )
        for line in proc.stdout or ():
            fh.write(line)
            text = line.strip()
            if any(k in text for k in (": Epoch ", "Pseudo dice", "Mean Validation Dice")):
                log.info("nnU-Net %s: %s", step, text)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        how = "was killed (out of memory?)" if rc < 0 else f"failed (exit code {rc})"
        msg = f"{log_path}: nnU-Net {step} {how}; last lines of its log:\n{tail}"
        raise EsmaError(msg)


def _worker_main(step: str, config_path: str) -> None:  # pragma: no cover - runs in a child
    """Entry point of the child process (see :func:`_run_worker`)."""
    cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
    if step == "plan":
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
        )

        extract_fingerprints([cfg["dataset_id"]], num_processes=cfg["workers"],
                             check_dataset_integrity=True, clean=True, verbose=False)
        plan_experiments([cfg["dataset_id"]], cfg["planner"])
    elif step == "preprocess":
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

        preprocess([cfg["dataset_id"]], cfg["plans_identifier"], [cfg["configuration"]],
                   [cfg["workers"]], verbose=False)
    elif step == "train":
        import torch

        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"] % 2**32)  # noqa: NPY002 - nnU-Net augments with the legacy RNG
        torch.set_num_threads(cfg["threads"])
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        fold = cfg["fold"] if cfg["fold"] == "all" else int(cfg["fold"])
        # as nnunetv2.run.run_training.get_trainer_from_args, with esma's trainer lookup
        base = Path(str(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(int(cfg["dataset_id"]))
        plans = json.loads((base / f"{cfg['plans_identifier']}.json").read_text(encoding="utf-8"))
        plans["continue_training"] = False
        dataset_json = json.loads((base / "dataset.json").read_text(encoding="utf-8"))
        trainer = find_trainer_class(cfg["trainer"])(
            plans=plans, configuration=cfg["configuration"], fold=fold,
            dataset_json=dataset_json, device=torch.device(cfg["device"]))
        trainer.num_epochs = int(cfg["epochs"])
        trainer.num_iterations_per_epoch = int(cfg["iterations_per_epoch"])
        trainer.num_val_iterations_per_epoch = int(cfg["val_iterations_per_epoch"])
        trainer.initial_lr = float(cfg["initial_lr"])
        trainer.save_every = int(cfg.get("save_every") or max(1, min(50, int(cfg["epochs"]) // 4)))
        if cfg.get("rotation_deg") is not None:
            _limit_rotation(trainer, float(cfg["rotation_deg"]))
        latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
        if cfg.get("resume") and latest.is_file():
            trainer.load_checkpoint(str(latest))  # as nnU-Net's --c: epoch, optimizer, logs
            sys.stdout.write(f"esma: resuming from {latest} at epoch {trainer.current_epoch}\n")
        elif cfg.get("pretrained_weights"):
            # as nnunetv2.run.run_training.maybe_load_checkpoint with pretrained_weights
            from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

            if not trainer.was_initialized:
                trainer.initialize()
            load_pretrained_weights(trainer.network, cfg["pretrained_weights"], verbose=False)
        trainer.run_training()
        trainer.perform_actual_validation(False)
    else:
        msg = f"unknown worker step {step!r}"
        raise SystemExit(msg)


def _limit_rotation(trainer: Any, degrees: float) -> None:  # pragma: no cover - in the child
    """Limit the rotation augmentation of one trainer instance to +-``degrees``.

    Wraps the instance's ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``: the
    mirror axes (and so the checkpoint's inference mirroring) stay nnU-Net's.
    """
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    original = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size

    def limited() -> tuple:
        _, dummy_2d, _, mirror_axes = original()
        rad = float(np.deg2rad(degrees))
        rotation = (-rad, rad)
        patch = trainer.configuration_manager.patch_size
        initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
        if dummy_2d:
            initial[0] = patch[0]
        return rotation, dummy_2d, initial, mirror_axes

    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size = limited


# --------------------------------------------------------------------- plan / preprocess
def _small_plans(plans: dict, fingerprint: dict, small: SmallNetwork) -> dict:
    """Rewrite the planned 2d configuration into the small CPU network (pure function)."""
    cfg = json.loads(json.dumps(plans["configurations"]["2d"]))
    n_stages = len(small.features)
    if n_stages < 2:
        msg = "small_network.features needs at least two stages"
        raise ConfigError(msg)
    div = 2 ** (n_stages - 1)
    tf = plans["transpose_forward"]
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)[:, tf]
    spacings = np.asarray(fingerprint["spacings"], dtype=float)[:, tf]
    inplane = np.median(shapes[:, 1:] * spacings[:, 1:] / small.spacing_mm, axis=0)
    if small.patch_size is not None:
        patch = [int(p) for p in small.patch_size]
        if len(patch) != 2 or any(p % div for p in patch):
            msg = f"small_network.patch_size must be two multiples of {div}, got {small.patch_size}"
            raise ConfigError(msg)
    else:
        patch = [int(math.ceil(s / div) * div) for s in inplane]
    arch = cfg["architecture"]["arch_kwargs"]
    arch.update({
        "n_stages": n_stages,
        "features_per_stage": list(small.features),
        "kernel_sizes": [[3, 3]] * n_stages,
        "strides": [[1, 1]] + [[2, 2]] * (n_stages - 1),
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
    })
    cfg.update({
        "data_identifier": f"{small.plans_name}_2d",
        "batch_size": int(small.batch_size),
        "patch_size": patch,
        "spacing": [float(small.spacing_mm)] * 2,
        "median_image_size_in_voxels": [float(round(s)) for s in inplane],
    })
    out = json.loads(json.dumps(plans))
    out["plans_name"] = small.plans_name
    out["configurations"] = {"2d": cfg}
    return out


def plan_and_preprocess(dirs: NnunetDirs, settings: TrainSettings) -> str:
    """Fingerprint, plan and preprocess the raw dataset; return the plans identifier.

    With ``settings.small_network`` the 2d configuration of the default plans is rewritten
    (:class:`SmallNetwork`) and saved as its own plans file before preprocessing.
    """
    env = dirs.env()
    logs = dirs.root / "logs"
    workers = max(1, int(settings.preprocess_workers))
    _run_worker("plan", {"dataset_id": settings.dataset_id, "workers": workers,
                         "planner": settings.planner}, env, logs / "plan.log")
    pre = dirs.preprocessed / settings.dataset_folder_name
    planned = sorted(pre.glob("*Plans*.json"), key=lambda p: p.stat().st_mtime)
    if not planned:
        msg = f"{pre}: nnU-Net planning wrote no plans file"
        raise EsmaError(msg)
    plans_file = planned[-1]
    plans_identifier = plans_file.stem
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    if settings.init_from is None and settings.configuration not in plans["configurations"]:
        have = ", ".join(plans["configurations"])
        msg = f"nnU-Net planned no {settings.configuration!r} configuration (planned: {have})"
        raise ConfigError(msg)
    if settings.init_from is not None:
        plans_identifier = _parent_plans(settings, pre)
    elif settings.small_network is not None:
        fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text(encoding="utf-8"))
        small = _small_plans(plans, fingerprint, settings.small_network)
        plans_identifier = settings.small_network.plans_name
        atomic_write_text(pre / f"{plans_identifier}.json", json.dumps(small, indent=2))
    _run_worker("preprocess", {"dataset_id": settings.dataset_id, "workers": workers,
                               "plans_identifier": plans_identifier,
                               "configuration": settings.configuration}, env,
                logs / "preprocess.log")
    return plans_identifier


# ----------------------------------------------------------------------------- training
def _trainer_name(settings: TrainSettings, labels: LabelTable) -> str:
    if settings.trainer is not None:
        if labels.is_sided() and "NoMirroring" not in settings.trainer:
            log.warning("labels are sided but trainer %s may mirror left and right; prefer %s",
                        settings.trainer, _TRAINER_SIDED)
        return settings.trainer
    return _TRAINER_SIDED if labels.is_sided() else _TRAINER_DEFAULT


def _trainer_folder(dirs: NnunetDirs, settings: TrainSettings, trainer: str, plans: str) -> Path:
    return (dirs.results / settings.dataset_folder_name
            / f"{trainer}__{plans}__{settings.configuration}")


def train_fold(
    dirs: NnunetDirs,
    settings: TrainSettings,
    plans_identifier: str,
    trainer: str,
    fold: int | str,
) -> Path:
    """Train one fold and run nnU-Net's validation on it; return the fold folder.

    The fold folder then holds ``checkpoint_final.pth``, ``progress.png`` and
    ``validation/summary.json`` (all three are required for export).
    """
    n_threads = settings.num_threads or available_cores()
    da = settings.da_workers if settings.da_workers is not None else max(1, min(4, available_cores() - 1))
    env = dict(dirs.env())
    env.update({"nnUNet_n_proc_DA": str(da), "nnUNet_def_n_proc": "1"})
    # Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads triple
    # the time per iteration (measured); on a quiet machine the cost is small.
    env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    cfg = {
        "dataset_id": settings.dataset_id,
        "configuration": settings.configuration,
        "fold": fold,
        "trainer": trainer,
        "plans_identifier": plans_identifier,
        "device": _resolve_device(settings.device),
        "epochs": settings.epochs,
        "iterations_per_epoch": settings.iterations_per_epoch,
        "val_iterations_per_epoch": settings.val_iterations_per_epoch,
        "initial_lr": settings.initial_lr,
        "rotation_deg": settings.rotation_deg,
        "threads": n_threads,
        "seed": settings.seed,
        "resume": settings.resume,
        "save_every": settings.save_every,
        "pretrained_weights": (
            str(parent_checkpoint(settings.init_from, fold)) if settings.init_from else None
        ),
    }
    folder = _trainer_folder(dirs, settings, trainer, plans_identifier) / f"fold_{fold}"
    done = [folder / need for need in ("checkpoint_final.pth", "progress.png",
                                       "validation/summary.json")]
    if settings.resume and all(p.is_file() for p in done):
        log.info("fold %s already trained in %s: reused", fold, folder)
        return folder
    log_name = f"train_fold_{fold}.log"
    if settings.resume and (folder / "checkpoint_latest.pth").is_file():
        log_name = f"train_fold_{fold}_resumed_{time.strftime('%Y%m%dT%H%M%S')}.log"
    _run_worker("train", cfg, env, dirs.root / "logs" / log_name)
    for need in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
        if not (folder / need).is_file():
            msg = f"{folder}: training finished without {need}"
            raise EsmaError(msg)
    return folder


def _write_splits(dirs: NnunetDirs, settings: TrainSettings, case_ids: Sequence[str]) -> None:
    """Write the single split of ``validation_cases``, or remove a stale split of an earlier run
    (nnU-Net then makes its seeded 5-fold split of the current cases)."""
    target = dirs.preprocessed / settings.dataset_folder_name / "splits_final.json"
    if settings.validation_cases is None:
        target.unlink(missing_ok=True)
        return
    val = list(settings.validation_cases)
    unknown = sorted(set(val) - set(case_ids))
    if unknown:
        msg = f"validation_cases {unknown} are not among the training cases"
        raise ConfigError(msg)
    train = [c for c in case_ids if c not in set(val)]
    if not train or not val:
        msg = "validation_cases must leave at least one training case and name one"
        raise ConfigError(msg)
    splits = [{"train": train, "val": val}]
    atomic_write_text(target, json.dumps(splits, indent=2))


def _validation_table(trainer_dir: Path, folds: Sequence[int | str], labels: LabelTable) -> pd.DataFrame:
    """Per-case, per-label Dice of nnU-Net's validation (fold_k/validation/summary.json)."""
    rows = []
    for fold in folds:
        summary = json.loads((trainer_dir / f"fold_{fold}" / "validation" / "summary.json")
                             .read_text(encoding="utf-8"))
        for case in summary.get("metric_per_case", []):
            case_id = Path(case["prediction_file"]).name.removesuffix(".nii.gz")
            for key, metrics in case["metrics"].items():
                lab = labels.by_value(int(key))
                rows.append({"fold": str(fold), "case": case_id, "value": lab.value,
                             "muscle": lab.muscle, "side": lab.side,
                             "dice": float(metrics["Dice"])})
    return pd.DataFrame(rows, columns=["fold", "case", "value", "muscle", "side", "dice"])


# ------------------------------------------------------------------------------- export
def _strip_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint without optimizer state (inference reads only the weights)."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["optimizer_state"] = None
    ckpt["grad_scaler_state"] = None
    with atomic_path(dst) as tmp:
        torch.save(ckpt, tmp)


def export_model(
    trainer_dir: Path,
    folds: Sequence[int | str],
    out_zip: Path,
    labels: LabelTable,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export a trained model folder to a zip that both esma and nnU-Net can use.

    The zip holds, under ``DatasetXXX_Name/<trainer>__<plans>__<configuration>/``:
    ``plans.json``, ``dataset.json``, ``dataset_fingerprint.json``, ``labels.json`` (esma),
    ``esma_model.json`` (esma) and per fold ``checkpoint_final.pth`` (without optimizer state),
    ``progress.png`` and ``validation/summary.json``.  It is written by nnU-Net's own
    ``export_pretrained_model`` with the configuration named explicitly.

    Raises
    ------
    ModelError
        A fold lacks one of the files export requires.
    """
    from helpers.errors import ModelError

    trainer_dir = Path(trainer_dir)
    trainer, plans_identifier, configuration = trainer_dir.name.split("__")
    dataset_name = trainer_dir.parent.name
    for fold in folds:
        for need in ("checkpoint_final.pth", "progress.png", "validation/summary.json"):
            if not (trainer_dir / f"fold_{fold}" / need).is_file():
                msg = f"fold_{fold}/{need} is missing (nnU-Net export needs it in every fold)"
                raise ModelError(trainer_dir, msg)
    for need in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if not (trainer_dir / need).is_file():
            raise ModelError(trainer_dir, f"{need} is missing")
    meta = {
        "format": MODEL_FORMAT,
        "configuration": configuration,
        "trainer": trainer,
        "plans": plans_identifier,
        "folds": [str(f) for f in folds],
        "sided": labels.is_sided(),
        "labels_file": LABELS_FILE,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": runtime_versions(),
    }
    meta.update(dict(metadata or {}))
    with tempfile.TemporaryDirectory(prefix="esma-export-") as tmp:
        stage = Path(tmp) / dataset_name / trainer_dir.name
        stage.mkdir(parents=True)
        for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            shutil.copy2(trainer_dir / name, stage / name)
        for fold in folds:
            src, dst = trainer_dir / f"fold_{fold}", stage / f"fold_{fold}"
            (dst / "validation").mkdir(parents=True)
            _strip_checkpoint(src / "checkpoint_final.pth", dst / "checkpoint_final.pth")
            shutil.copy2(src / "progress.png", dst / "progress.png")
            shutil.copy2(src / "validation" / "summary.json", dst / "validation" / "summary.json")
        extra = {
            LABELS_FILE: json.dumps(labels_document(labels), indent=2) + "\n",
            ESMA_MODEL_FILE: json.dumps(meta, indent=2, default=str) + "\n",
        }
        from nnunetv2.model_sharing.model_export import export_pretrained_model

        with atomic_path(out_zip) as tmp_zip, _patched_env({"nnUNet_results": str(tmp)}):
            with contextlib.redirect_stdout(io.StringIO()) as captured:
                export_pretrained_model(
                    dataset_name, str(tmp_zip), configurations=(configuration,),
                    trainer=trainer, plans_identifier=plans_identifier,
                    folds=tuple(folds), strict=True,
                )
            log.debug("nnU-Net export: %s", captured.getvalue())
            with zipfile.ZipFile(tmp_zip, "a", zipfile.ZIP_DEFLATED) as zf:
                for name, text in extra.items():
                    zf.writestr(f"{dataset_name}/{trainer_dir.name}/{name}", text)
    log.info("exported model %s (%.1f MB)", out_zip, out_zip.stat().st_size / 1e6)
    return Path(out_zip)


# -------------------------------------------------------------------------------- driver
def train_model(
    cases: Sequence[TrainingCase],
    labels: LabelTable | str | Path,
    work_dir: str | Path,
    out_zip: str | Path,
    settings: TrainSettings | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Convert, plan, preprocess, train, validate and export in one call.

    Parameters
    ----------
    cases : sequence of TrainingCase
        Labelled scans.
    labels : LabelTable or path
        Their label file (MuscleMap shape); sided labels train without mirroring.
    work_dir : path
        Scratch folder for nnU-Net's raw / preprocessed / results folders and logs (kept, so a
        failed step can be inspected; delete it when done).
    out_zip : path
        The exported model.
    settings : TrainSettings, optional
        Defaults: nnU-Net's (a long GPU training).
    metadata : mapping, optional
        Extra entries for ``esma_model.json`` (e.g. training-data description).

    Returns
    -------
    TrainResult
        The zip, the trained model folder, nnU-Net's validation Dice per case and label, the
        wall time and the CPU time (s) of all steps together.
    """
    settings = settings or TrainSettings()
    table = labels if isinstance(labels, LabelTable) else load_labels(labels)
    if settings.init_from is not None:
        metadata = {**dict(metadata or {}), **parent_card(settings.init_from, table, cases)}
    dirs = NnunetDirs(Path(work_dir)).make()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    stages: dict[str, float] = {}

    stamp_file = dirs.root / "prepared.json"
    stamp = _prepared_stamp(cases, table, settings)
    prepared = json.loads(stamp_file.read_text(encoding="utf-8")) if stamp_file.is_file() else {}
    if settings.resume and prepared.get("stamp") == stamp:
        plans_identifier = str(prepared["plans_identifier"])
        log.info("resume: raw dataset and preprocessed data unchanged, reused (%s)", stamp_file)
        stages["convert"] = stages["plan_preprocess"] = 0.0
    else:
        stamp_file.unlink(missing_ok=True)
        t = time.perf_counter()
        write_raw_dataset(cases, table, dirs, settings)
        stages["convert"] = time.perf_counter() - t
        t = time.perf_counter()
        plans_identifier = plan_and_preprocess(dirs, settings)
        _write_splits(dirs, settings, [c.case_id for c in cases])
        stages["plan_preprocess"] = time.perf_counter() - t
        atomic_write_text(stamp_file, json.dumps({"stamp": stamp,
                                                  "plans_identifier": plans_identifier}))
    trainer = _trainer_name(settings, table)
    if settings.init_from is not None:
        trainer = _parent_model(settings.init_from).trainer  # same network, same mirroring
    t = time.perf_counter()
    for fold in settings.folds:
        train_fold(dirs, settings, plans_identifier, trainer, fold)
    stages["train"] = time.perf_counter() - t
    trainer_dir = _trainer_folder(dirs, settings, trainer, plans_identifier)
    atomic_write_text(trainer_dir / LABELS_FILE, json.dumps(labels_document(table), indent=2))
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    meta = {
        "training": {
            "n_cases": len(cases),
            "validation_cases": list(settings.validation_cases or []),
            "settings": _settings_dict(settings, trainer, plans_identifier),
            "seconds_until_export": round(wall, 1),
            "cpu_seconds_until_export": round(cpu, 1),
        }
    }
    meta.update(dict(metadata or {}))
    t = time.perf_counter()
    export_model(trainer_dir, settings.folds, Path(out_zip), table, meta)
    stages["export"] = time.perf_counter() - t
    validation = _validation_table(trainer_dir, settings.folds, table)
    return TrainResult(Path(out_zip), trainer_dir, validation, time.perf_counter() - t0,
                       _cpu_seconds() - c0, stages)


def _prepared_stamp(cases: Sequence[TrainingCase], labels: LabelTable,
                    settings: TrainSettings) -> str:
    """Checksum of what the raw and preprocessed datasets depend on (for ``resume``)."""
    import hashlib

    h = hashlib.sha256()
    for case in cases:
        for path in (Path(case.image), Path(case.mask)):
            st = path.stat()
            h.update(f"{case.case_id}|{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    keep = {k: v for k, v in asdict(settings).items()
            if k in ("dataset_id", "dataset_name", "configuration", "validation_cases",
                     "planner", "small_network", "reader", "init_from", "ignore_label")}
    h.update(json.dumps([labels_document(labels), keep], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _settings_dict(settings: TrainSettings, trainer: str, plans: str) -> dict[str, Any]:
    d = asdict(settings)
    d["trainer"] = trainer
    d["plans_identifier"] = plans
    d["device"] = _resolve_device(settings.device)
    return json.loads(json.dumps(d, default=str))


def _cpu_seconds() -> float:
    """CPU time (s) of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---------------------------------------------------------------------------- evaluation
def evaluate_masks(
    pairs: Mapping[str, tuple[str | Path, str | Path]],
    labels: LabelTable,
) -> pd.DataFrame:
    """Dice per subject and label for ``{subject: (predicted_mask, reference_mask)}``.

    Both masks of a pair must lie on the same grid (checked).  Returns columns
    ``subject, value, muscle, side, dice``.
    """
    rows = []
    for subject, (pred_path, ref_path) in pairs.items():
        pred, ref = load_mask(pred_path), load_mask(ref_path)
        check_same_grid(ref, pred)
        for value, d in dice_per_label(pred.data, ref.data, labels.values).items():
            lab = labels.by_value(value)
            rows.append({"subject": subject, "value": value, "muscle": lab.muscle,
                         "side": lab.side, "dice": d})
    return pd.DataFrame(rows, columns=["subject", "value", "muscle", "side", "dice"])


# ------------------------------------------------------------------- untrained test model
def make_untrained_model(
    folder: str | Path,
    labels: LabelTable,
    *,
    features: Sequence[int] = (4, 8, 16),
    patch_size: tuple[int, int] = (32, 32),
    spacing_mm: float = 2.0,
    trainer: str | None = None,
    n_channels: int = 1,
    folds: Sequence[int] = (0,),
    seed: int = 0,
    dataset_name: str = "Dataset999_EsmaUntrained",
    reader: str = "SimpleITKIO",
) -> Path:
    """Write an nnU-Net 2d model folder with *random* weights; return the trained-model folder.

    For tests and smoke runs only: it has everything nnU-Net's inference and export need
    (``plans.json``, ``dataset.json``, ``labels.json``, ``dataset_fingerprint.json``,
    ``fold_K/checkpoint_final.pth``, ``progress.png``, ``validation/summary.json``) and loads in
    both ``esma segment`` and ``nnUNetv2_predict_from_modelfolder``, but its labels are noise.
    Sided labels get ``nnUNetTrainerNoMirroring`` (no mirror axes), unsided ``nnUNetTrainer``.
    """
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    trainer = trainer or (_TRAINER_SIDED if labels.is_sided() else _TRAINER_DEFAULT)
    n = len(features)
    plans = {
        "dataset_name": dataset_name,
        "plans_name": "esmaUntrainedPlans",
        "original_median_spacing_after_transp": [4.0, spacing_mm, spacing_mm],
        "original_median_shape_after_transp": [8, 64, 64],
        "image_reader_writer": reader,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"2d": {
            "data_identifier": "esmaUntrainedPlans_2d",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": list(patch_size),
            "median_image_size_in_voxels": [64.0, 64.0],
            "spacing": [float(spacing_mm)] * 2,
            "normalization_schemes": ["ZScoreNormalization"] * n_channels,
            "use_mask_for_norm": [False] * n_channels,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                          "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                         "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name":
                    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n, "features_per_stage": list(features),
                    "conv_op": "torch.nn.modules.conv.Conv2d",
                    "kernel_sizes": [[3, 3]] * n, "strides": [[1, 1]] + [[2, 2]] * (n - 1),
                    "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
                    "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "batch_dice": True,
        }},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 1000.0, "mean": 100.0, "median": 80.0, "min": 0.0,
                     "percentile_00_5": 1.0, "percentile_99_5": 900.0, "std": 100.0}
            for c in range(n_channels)},
    }
    dataset = {"channel_names": {str(c): f"T2_{c}" if c else "T2" for c in range(n_channels)},
               "labels": dataset_json_labels(labels), "numTraining": 1,
               "file_ending": ".nii.gz"}
    out = Path(folder) / dataset_name / f"{trainer}__esmaUntrainedPlans__2d"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plans.json", json.dumps(plans, indent=2))
    atomic_write_text(out / "dataset.json", json.dumps(dataset, indent=2))
    atomic_write_text(out / "dataset_fingerprint.json", json.dumps({"spacings": [], "shapes_after_crop": []}))
    atomic_write_text(out / LABELS_FILE, json.dumps(labels_document(labels), indent=2))
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    trainer_class = find_trainer_class(trainer)
    mirror = None if "NoMirroring" in trainer else (0, 1)
    for fold in folds:
        torch.manual_seed(seed + int(fold))
        net = trainer_class.build_network_architecture(
            pm, cm, n_channels, len(labels.values) + 1, enable_deep_supervision=False)
        fold_dir = out / f"fold_{fold}"
        (fold_dir / "validation").mkdir(parents=True, exist_ok=True)
        ckpt = {
            "network_weights": net.state_dict(), "optimizer_state": None,
            "grad_scaler_state": None, "logging": {}, "_best_ema": None, "current_epoch": 0,
            "init_args": {"plans": plans, "configuration": "2d", "fold": int(fold),
                          "dataset_json": dataset, "device": torch.device("cpu")},
            "trainer_name": trainer, "inference_allowed_mirroring_axes": mirror,
        }
        torch.save(ckpt, fold_dir / "checkpoint_final.pth")
        (fold_dir / "progress.png").write_bytes(_PNG_1PX)
        summary = {"foreground_mean": {"Dice": float("nan")}, "mean": {}, "metric_per_case": []}
        atomic_write_text(fold_dir / "validation" / "summary.json", json.dumps(summary))
    return out


#: A valid 1x1 PNG (placeholder progress plot of :func:`make_untrained_model`).
_PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


# --------------------------------------------------------- fine-tuning a parent model (issue 15)
def _parent_model(init_from: str | Path) -> Any:
    from helpers.segment import load_model

    return load_model(init_from)


def parent_checkpoint(init_from: str | Path, fold: int | str) -> Path:
    """The parent model's checkpoint that initialises ``fold`` (the same fold, else its first).

    Raises
    ------
    ModelError
        The parent has no fold checkpoint (via :func:`helpers.segment.load_model`).
    """
    info = _parent_model(init_from)
    use = fold if fold in info.folds else info.folds[0]
    return Path(info.folder) / f"fold_{use}" / "checkpoint_final.pth"


def _parent_plans(settings: TrainSettings, preprocessed: Path) -> str:
    """Copy the parent's plans into the new dataset's preprocessed folder; return their name.

    The parent's network, spacing and normalisation are kept (the weights must fit); only the
    dataset name changes.  The new dataset's own fingerprint (written by the planning step) is
    used for its intensity statistics.
    """
    info = _parent_model(str(settings.init_from))
    plans = json.loads((Path(info.folder) / "plans.json").read_text(encoding="utf-8"))
    if info.configuration not in plans.get("configurations", {}):
        msg = f"parent plans lack the {info.configuration!r} configuration"
        raise ModelError(info.source, msg)
    if settings.configuration != info.configuration:
        msg = (
            f"the parent model is a {info.configuration!r} model: fine-tune with "
            f"configuration={info.configuration!r}, not {settings.configuration!r}"
        )
        raise ConfigError(msg)
    plans["dataset_name"] = settings.dataset_folder_name
    name = str(plans.get("plans_name") or info.plans)
    atomic_write_text(preprocessed / f"{name}.json", json.dumps(plans, indent=2))
    return name


def parent_card(
    init_from: str | Path, labels: LabelTable, cases: Sequence[TrainingCase]
) -> dict[str, Any]:
    """Model-card entries of a fine-tuned model: its parent (file, sha256, labels) and cases.

    Raises
    ------
    ModelError
        Naming the parent: its output labels differ from the cases' labels (the output layer
        would not fit).
    """
    info = _parent_model(init_from)
    parent = [(x.value, x.muscle, x.side) for x in info.labels.labels]
    mine = [(x.value, x.muscle, x.side) for x in labels.labels]
    if parent != mine:
        msg = (
            f"its labels {parent} differ from the training labels {mine}: a fine-tuned model "
            "keeps its parent's outputs"
        )
        raise ModelError(info.source, msg)
    return {
        "parent_model": {
            "file": Path(info.source).name,
            "sha256": info.sha256,
            "configuration": info.configuration,
            "trainer": info.trainer,
            "plans": info.plans,
        },
        "fine_tuned_on": sorted(c.case_id for c in cases),
    }


def compare_models(
    models: Mapping[str, str | Path],
    cases: Sequence[TrainingCase],
    labels: LabelTable,
    work_dir: str | Path,
    *,
    device: str = "cpu",
) -> pd.DataFrame:
    """Dice of several models on held-out cases (e.g. ``{"before": parent, "after": child}``).

    Each model's raw prediction is scored: segmentation's scan checks (``check_scan``: refuse a
    scan that is not a lumbar cross-section, or a result with no psoas / quadratus lumborum or
    dim fat) are off here, because they withhold the mask of exactly the cases a model gets
    wrong (a model that misses the psoas scores Dice 0 for it instead of failing the comparison).
    Predictions are written in the label space of ``labels``: an unsided model's labels are
    split into left/right (:func:`helpers.labels.split_sides`) only when ``labels`` are sided,
    so unsided reference masks are compared with unsided predictions.

    Returns
    -------
    DataFrame
        ``model, subject, value, muscle, side, dice`` (one row per model, case and label).
    """
    from helpers.segment import SegmentSettings, segment_cohort

    frames = []
    for name, model in models.items():
        out = segment_cohort(
            [c.image for c in cases],
            model,
            Path(work_dir) / name,
            SegmentSettings(device=device, check_scan=False, split_sides=labels.is_sided()),
            progress=False,
        )
        masks = dict(zip(out["image"].astype(str), out["mask"], strict=True))
        pairs = {c.case_id: (masks[str(c.image)], c.mask) for c in cases}
        frames.append(evaluate_masks(pairs, labels).assign(model=name))
    table = pd.concat(frames, ignore_index=True)
    return table[["model", "subject", "value", "muscle", "side", "dice"]]
