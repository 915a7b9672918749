"""The nnU-Net runtime of this process: CPU cores, package versions, trainer classes.

Shared by inference (:mod:`helpers.segment`) and training (:mod:`helpers.training`), so that
neither imports the other.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["available_cores", "find_trainer_class", "runtime_versions"]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def runtime_versions() -> dict[str, str]:
    """Python, nnunetv2, torch and esma versions, for sidecars and training records."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("nnunetv2", "torch", "esma"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover - not installed
            out[pkg] = "unknown"
    return out


#: Trainer sub-packages never searched: they import optional dependencies (timm/torchvision for
#: the Primus transformers) that crash on CPU-only installs.
_SKIP_TRAINER_PACKAGES = ("primus",)


def find_trainer_class(name: str) -> type:
    """The nnU-Net trainer class called ``name``.

    Searches ``nnunetv2.training.nnUNetTrainer`` like nnU-Net does, but never imports the
    sub-packages in :data:`_SKIP_TRAINER_PACKAGES` and skips modules that fail to import: nnU-Net's
    own search imports every module until it finds the class, so on an install where
    ``torchvision`` does not load, any trainer other than ``nnUNetTrainer`` crashes it.
    Falls back to nnU-Net's search (which honours ``nnUNet_extTrainer``).

    Raises
    ------
    ModelError
        No trainer class of that name.
    """
    import importlib
    import pkgutil

    import nnunetv2.training.nnUNetTrainer as package
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from helpers.errors import ModelError

    if name == "nnUNetTrainer":
        return nnUNetTrainer

    def search(paths: list[str], prefix: str) -> type | None:
        entries = sorted(pkgutil.iter_modules(paths), key=lambda m: (m.ispkg, m.name))
        for mod in entries:
            if mod.ispkg:
                continue
            try:
                module = importlib.import_module(f"{prefix}.{mod.name}")
            except Exception:  # noqa: BLE001 - a variant with a missing optional dependency
                log.debug("skipping trainer module %s.%s (import failed)", prefix, mod.name)
                continue
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, nnUNetTrainer):
                return cls
        for mod in entries:
            if mod.ispkg and mod.name not in _SKIP_TRAINER_PACKAGES:
                found = search([str(Path(paths[0]) / mod.name)], f"{prefix}.{mod.name}")
                if found is not None:
                    return found
        return None

    found = search(list(package.__path__), package.__name__)
    if found is not None:
        return found
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        return recursive_find_trainer_class_by_name(name)
    except Exception as exc:
        msg = f"trainer class {name} is not known to nnU-Net ({type(exc).__name__}: {exc})"
        raise ModelError(Path(name), msg) from exc
