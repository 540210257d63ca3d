"""Checks the launcher runs before any process starts, so a bad run fails in one line.

Each check returns quietly or raises the project's existing user error with one line: a
`ManifestError` naming the file for data problems, a `ConfigError` naming the config key for
settings (both are already caught and printed by the CLI and the simulation launcher).

    train_ds, _ = load_manifest(cfg.data.train)
    test_ds, _ = load_manifest(cfg.data.test)
    check_train_labels(train_ds, cfg.data.train)
    check_test_labels(label_names(train_ds), test_ds, cfg.data.test)
    check_device(cfg.device)
    check_writable(cfg.output_dir)
    check_output_file(args.out)     # fedmm predict / evaluate: an output file
    check_trackers(cfg.logging)
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import datasets
import torch

from common.config import ConfigError
from common.data import ManifestError

SHOWN = 5  # labels named in a message


def _names(items: Iterable[str], limit: int = SHOWN) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(repr(i) for i in items[:limit]) + more


def check_train_labels(train_ds: datasets.Dataset, train_path: str | Path) -> None:
    """Refuse a training manifest whose rows all share one label (nothing to tell apart)."""
    labels = set(train_ds["label"])
    if len(labels) < 2:
        raise ManifestError(f"{train_path}: all {len(train_ds)} rows have the label "
                            f"{_names(labels)}; a classifier needs at least 2 labels")


def check_test_labels(train_labels: Sequence[str], test_ds: datasets.Dataset,
                      test_path: str | Path) -> None:
    """Refuse a test manifest holding labels the training manifest never has."""
    known = set(train_labels)
    missing = Counter(lab for lab in test_ds["label"] if lab not in known)
    if missing:
        found = [f"{lab!r} ({n} row{'s' * (n != 1)})" for lab, n in missing.most_common(SHOWN)]
        more = f", ... ({len(missing)} labels in all)" if len(missing) > SHOWN else ""
        raise ManifestError(f"{test_path}: {sum(missing.values())} of {len(test_ds)} rows have "
                            f"labels absent from training: {', '.join(found)}{more} (training "
                            f"has {_names(sorted(known))})")


def check_device(setting: str, key: str = "device") -> None:
    """Refuse `device=cuda` (or `cuda:N`) when torch cannot use that GPU; `auto`/`cpu` pass."""
    if setting in ("auto", "cpu"):
        return
    if setting != "cuda" and not setting.startswith("cuda:"):
        raise ConfigError(f"{key} must be one of ['auto', 'cpu', 'cuda'] (got {setting!r})")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={setting}: no usable GPU (torch.cuda.is_available() is "
                          f"False, torch {torch.__version__}); use {key}=auto or {key}=cpu")
    index = setting.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"{key}={setting}: this machine has {torch.cuda.device_count()} GPU(s)"
                          f" (cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def _write_problem(folder: Path) -> str | None:
    """Why no file can be written in `folder` (created if missing), or None."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedmm-write-check-"):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def check_writable(folder: str | Path, key: str = "output_dir") -> Path:
    """Create `folder` if missing and prove a file can be written there; return it resolved."""
    folder = Path(folder).expanduser()
    why = _write_problem(folder)
    if why:
        raise ConfigError(f"{key}={folder}: not a writable folder ({why})")
    return folder.resolve()


def check_output_file(path: str | Path, key: str = "--out") -> Path:
    """Refuse an output file that is a folder or whose folder cannot be written; return it."""
    path = Path(path).expanduser()
    why = "is a folder" if path.is_dir() else _write_problem(path.parent)
    if why:
        raise ConfigError(f"{key}={path}: cannot write this file ({why})")
    return path.resolve()
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def check_trackers(logging: Sequence[str]) -> None:
    """Refuse `logging=[...]` naming a tracker whose package is not installed."""
    import importlib.util

    missing = [name for name in logging if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
    if missing:
        raise ConfigError(f"logging: {', '.join(missing)} not installed (pip install "
                          f"'fedmm[tracking]', or drop it from logging)")
