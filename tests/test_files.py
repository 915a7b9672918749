"""Atomic writes and completion markers (helpers.files)."""

from __future__ import annotations

import errno
import os

import pytest

from helpers.errors import OutputError
from helpers.files import atomic_path, atomic_write_text, is_done, mark_done, sha256_file


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    atomic_write_text(target, "a,b\n1,2\n")
    atomic_write_text(target, "a,b\n3,4\n")
    assert target.read_text() == "a,b\n3,4\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


def test_outputs_get_the_umask_mode_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        target = atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o666 & ~0o022


def test_failure_inside_the_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    def killed_mid_write() -> None:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        killed_mid_write()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_full_disk_is_an_output_error_naming_the_file(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=r"metrics\.csv: cannot write output \(disk full\)"):
        atomic_write_text(tmp_path / "metrics.csv", "x")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_an_output_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write output"):
        atomic_write_text(blocker / "out.csv", "x")


def test_done_markers_check_checksum_and_settings(tmp_path):
    target = atomic_write_text(tmp_path / "seg.nii.gz", "mask bytes")
    assert not is_done(target, {"fast": True})  # written, but never marked
    marker = mark_done(target, {"fast": True, "folds": [0]})
    assert marker.name == "seg.nii.gz.done.json"
    assert sha256_file(target) in marker.read_text()
    assert is_done(target, {"fast": True, "folds": [0]})
    assert not is_done(target, {"fast": False, "folds": [0]})  # other settings: redo
    target.write_text("torn")  # changed behind esma's back
    assert not is_done(target, {"fast": True, "folds": [0]})
