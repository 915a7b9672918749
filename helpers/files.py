"""Atomic writes and completion markers.

Outputs are written to a temporary file in the destination folder and renamed into place, so a
reader never sees a half-written file and a killed run leaves at most a stray ``.tmp`` file.
A completion marker (``<file>.done.json``) records the sha256 of the finished file and the
settings that produced it; work counts as done only when the marker matches the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from helpers.errors import OutputError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_done",
    "mark_done",
    "sha256_file",
]

MARKER_SUFFIX = ".done.json"
#: The process umask, read once: outputs get the usual 0o666 & ~umask mode, not mkstemp's 0o600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    The temporary file keeps ``target``'s suffixes (``.nii.gz`` writers look at them).  On any
    exception the temporary file is removed and ``target`` is left untouched.

    Raises
    ------
    OutputError
        The folder cannot be created or written, or the disk is full.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(target.suffixes) or ".tmp"
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=target.parent
        )
        os.close(fd)
        Path(tmp_name).chmod(0o666 & ~_UMASK)
    except OSError as exc:
        msg = f"{target}: cannot write output ({_describe_os_error(exc)})"
        raise OutputError(msg) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        msg = f"{target}: cannot write output ({_describe_os_error(exc)})"
        raise OutputError(msg) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically and return ``target``."""
    with atomic_path(target) as tmp:
        _write_and_sync(tmp, lambda fh: fh.write(data))
    return Path(target)


def atomic_write_text(target: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically and return ``target``."""
    return atomic_write_bytes(target, text.encode(encoding))


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def mark_done(target: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Write the completion marker of a finished output file.

    Parameters
    ----------
    target : path
        The finished file (already in place).
    settings : mapping, optional
        JSON-serialisable settings that produced it; :func:`is_done` compares them.
    """
    target = Path(target)
    marker = target.with_name(target.name + MARKER_SUFFIX)
    record = {"file": target.name, "sha256": sha256_file(target), "settings": dict(settings or {})}
    atomic_write_text(marker, json.dumps(record, indent=2, sort_keys=True, default=str))
    return marker


def is_done(target: str | Path, settings: Mapping[str, Any] | None = None) -> bool:
    """True when ``target`` exists with a marker whose checksum and settings match.

    A file without a marker (a run killed between write and marker), a file whose content no
    longer matches its marker, or one made with other settings is not done.
    """
    target = Path(target)
    marker = target.with_name(target.name + MARKER_SUFFIX)
    if not (target.is_file() and marker.is_file()):
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if record.get("sha256") != sha256_file(target):
        return False
    wanted = json.loads(json.dumps(dict(settings or {}), sort_keys=True, default=str))
    return record.get("settings", {}) == wanted


def _write_and_sync(path: Path, write: Callable[[Any], object]) -> None:
    with path.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "folder not writable"
    return exc.strerror or str(exc)
