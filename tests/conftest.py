"""Shared fixtures.  Module-specific fixtures live in their own test files."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

# Third-party pools that take the platform default (nnU-Net's dataset listing opens a plain
# multiprocessing.Pool) must not fork this many-threaded test process: a forked worker can
# inherit a lock held by another thread and hang the suite (seen once: a worker forked by
# nnunetv2.utilities.utils.create_lists_from_splitted_dataset_folder sat on a futex for minutes).
# esma's own pools already use spawn (helpers.executor, helpers.trainset).
multiprocessing.set_start_method("spawn", force=True)

REPO = Path(__file__).resolve().parents[1]
#: The real example scan, shipped with the repo (attribution in data/example/README.md).
EXAMPLE_DIR = REPO / "data" / "example"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """Folder holding the real example scan, its mask and labels.json."""
    return EXAMPLE_DIR


@pytest.fixture
def phantom_files(tmp_path):
    """Factory: a synthetic phantom (planted truth) written to ``folder`` (default
    ``tmp_path/data``, tables named ``<subject>_levels.csv`` etc.); returns
    :func:`helpers.synthetic.write_phantom`'s paths (image, mask, labels, levels, truth, ...)."""
    from helpers import synthetic

    def make(subject: str = "syn-001", folder: Path | None = None, **kwargs) -> dict[str, Path]:
        options = {"template": "small", "seed": 0, **kwargs}
        phantom = synthetic.make_phantom(subject, **options)
        return synthetic.write_phantom(phantom, folder or tmp_path / "data", prefix_tables=True)

    return make


@pytest.fixture
def study_folder(tmp_path):
    """Factory: ``study.yml`` in ``folder`` over its ``<subject>_T2w.nii.gz`` images,
    ``<subject>_dseg.nii.gz`` masks and ``labels.json`` (output ``folder/out``); ``extra`` is
    appended YAML.  Returns the YAML's path."""

    def make(folder: Path | None = None, extra: str = "", name: str = "tiny") -> Path:
        folder = Path(folder or tmp_path / "data")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "study.yml"
        path.write_text(
            f"study: {name}\nimages: '*_T2w.nii.gz'\nlabels: labels.json\n"
            f"masks: '{{subject}}_dseg.nii.gz'\noutput: out\n{extra}",
            encoding="utf-8",
        )
        return path

    return make
