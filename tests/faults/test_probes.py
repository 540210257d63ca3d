"""Probes: each bad input a new user tried, and the one line fedmm answers it with.

A probe builds its files, runs what the launcher or a site would run, and the line the user
sees (the error, else the warnings) must hold the expected fragment and nothing after a newline.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from common.config import ConfigError
from common.data import Encoding, ManifestError, encode, label_names, load_manifest
from common.preflight import check_device, check_test_labels, check_train_labels, check_writable

pytestmark = pytest.mark.faults
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
ENCODING = Encoding(("image", "text"), 8, MEAN, STD)  # 8x8 images, texts
Probe = Callable[[Path, pytest.MonkeyPatch], Callable[[], object]]


def _image(fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def _manifest(tmp: Path, name: str, labels: str, images: dict[int, bytes] | None = None,
              text: str = "note") -> Path:
    """A CSV with one row per label character; `images` replaces some rows' image bytes."""
    rows = []
    for i, label in enumerate(labels):
        (tmp / f"{name}{i}.png").write_bytes((images or {}).get(i, _image()))
        rows.append({"image": f"{name}{i}.png", "text": text, "label": label})
    path = tmp / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _train_site(tmp: Path, images: dict[int, bytes]) -> Callable[[], object]:
    """What a site does with its manifest: load it, then encode what was kept."""
    path = _manifest(tmp, "train", "abc", images)

    def site() -> object:
        ds, _ = load_manifest(path)
        return encode(ds, label_names(ds), ENCODING)
    return site


def _truncated_png(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    png = _image()
    return _train_site(tmp, {1: png[:len(png) // 2]})


def _corrupt_png(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    png = _image()
    return _train_site(tmp, {2: png[:80] + bytes(b ^ 0xFF for b in png[80:160]) + png[160:]})


def _truncated_jpeg(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _train_site(tmp, {0: _image("JPEG")[:-2]})


def _zero_byte_image(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _train_site(tmp, {0: b""})


def _only_row_truncated(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    path = _manifest(tmp, "one", "a", {0: _image()[:200]})
    return lambda: load_manifest(path)


def _test_label_absent(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    train, test = _manifest(tmp, "train", "abab"), _manifest(tmp, "test", "az")

    def launch() -> None:
        check_test_labels(label_names(load_manifest(train)[0]), load_manifest(test)[0], test)
    return launch


def _one_label(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    train = _manifest(tmp, "train", "aa")
    return lambda: check_train_labels(load_manifest(train)[0], train)


def _text_file(tmp: Path, name: str, content: str) -> Callable[[], object]:
    (tmp / "a.png").write_bytes(_image())
    (tmp / name).write_text(content)
    return lambda: load_manifest(tmp / name)


def _dup_csv(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "dup.csv", "image,text,label,label\na.png,note,a,b\n")


def _dup_jsonl(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "dup.jsonl", '{"image": "a.png", "text": "t", "label": "a", '
                                        '"label": "b"}\n')


def _dup_json(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "dup.json", '[{"image": "a.png", "text": "t", "text": "u", '
                                       '"label": "a"}]')


def _unquoted_comma(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    return _text_file(tmp, "m.csv", "image,text,label\na.png,a big, round thing,b\na.png,t,a\n")


def _lone_surrogate(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    rows = [{"image": "a.png", "text": "x\ud800", "label": "a"},
            {"image": "a.png", "text": "fine", "label": "a"}]
    return _text_file(tmp, "m.jsonl", "\n".join(json.dumps(r) for r in rows))


def _predict_without_labels(tmp: Path, mp: pytest.MonkeyPatch) -> Callable[[], object]:
    from common import inference

    mp.setattr(inference, "predict", lambda b, data, device: torch.zeros(len(data), 2))
    model = load_config(["model=minilm_cnn", "model.vision.image_size=8",
                         "model.modalities=[image,text]"]).model
    bundle = SimpleNamespace(label_names=["a", "b"], cfg=model)
    _text_file(tmp, "new.csv", "image,text\na.png,t\ngone.png,t\n")
    return lambda: inference.predict_manifest(bundle, tmp / "new.csv", tmp / "p.csv", "cpu")


def _cuda_without_gpu(tmp: Path, mp: pytest.MonkeyPatch) -> Callable[[], object]:
    mp.setattr(torch.cuda, "is_available", lambda: False)
    return lambda: check_device("cuda")


def _output_under_a_file(tmp: Path, _: pytest.MonkeyPatch) -> Callable[[], object]:
    (tmp / "runs").write_text("a file, not a folder")
    return lambda: check_writable(tmp / "runs" / "exp1")


PROBES: list[tuple[str, Probe, str]] = [
    ("truncated png", _truncated_png,
     "train.csv: skipped 1 of 3 rows (unreadable image: 1 [line 3: image file is truncated"),
    ("corrupt png data", _corrupt_png, "skipped 1 of 3 rows (unreadable image: 1 [line 4: "),
    ("truncated jpeg", _truncated_jpeg, "unreadable image: 1 [line 2: image file is truncated"),
    ("zero-byte image", _zero_byte_image, "unreadable image: 1 [line 2: not an image]"),
    ("only row truncated", _only_row_truncated,
     "one.csv: all 1 rows are unusable (unreadable image: 1 [line 2: "),
    ("test label absent from training", _test_label_absent,
     "test.csv: 1 of 2 rows have labels absent from training: 'z' (1 row) (training has 'a', "
     "'b')"),
    ("training rows share one label", _one_label,
     "train.csv: all 2 rows have the label 'a'; a classifier needs at least 2 labels"),
    ("csv column twice", _dup_csv, "dup.csv: duplicate column 'label' in the header"),
    ("jsonl key twice", _dup_jsonl, "dup.jsonl:1: duplicate key 'label' in one JSON object"),
    ("json list key twice", _dup_json, "dup.json: duplicate key 'text' in one JSON object"),
    ("unquoted comma in csv text", _unquoted_comma, "more cells than columns: 1 [line 2]"),
    ("lone surrogate in json", _lone_surrogate, "m.jsonl: skipped 1 of 2 rows (invalid Unicode"),
    ("predict on a manifest without labels", _predict_without_labels,
     "new.csv: skipped 1 of 2 rows (missing image file: 1 [line 3])"),
    ("cuda without a gpu", _cuda_without_gpu, "device=cuda: no usable GPU"),
    ("output folder under a file", _output_under_a_file, "/runs/exp1: not a writable folder"),
]


@pytest.mark.parametrize("build,expected", [p[1:] for p in PROBES], ids=[p[0] for p in PROBES])
def test_probe_answers_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture, build: Probe,
                                   expected: str) -> None:
    run = build(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        try:
            run()
            line = " | ".join(r.getMessage() for r in caplog.records)
        except (ManifestError, ConfigError) as err:
            line = str(err)
    assert expected in line, line
    assert "\n" not in line and "Traceback" not in line


# --- the `fedmm` command and the launchers: exit code 2 (1 for simulations.run) and one line --

@pytest.fixture(scope="module")
def adapter_and_data(tmp_path_factory, tiny_text_dir) -> tuple[Path, Path]:
    """A saved adapter (with its config.json) and a labelled manifest it can read."""
    from common.config import to_json
    from common.demo_data import generate
    from common.model import build_model, save_adapter

    root = tmp_path_factory.mktemp("cli-probes")
    _, test = generate(root / "demo", 6, 6, seed=0)
    cfg = load_config(["model=minilm_cnn", f"model.text.name_or_path={tiny_text_dir}",
                       "model.fusion_dim=16", "model.vision.channels=[8]",
                       "model.modalities=[image,text]"])
    labels = sorted({row["label"] for row in csv.DictReader(test.open())})
    save_adapter(build_model(cfg.model, labels), root / "adapter")
    (root / "adapter" / "config.json").write_text(to_json(cfg))
    return root / "adapter", test


def _damaged_copy(adapter: Path, tmp: Path, damage: Callable[[Path], None]) -> Path:
    import shutil

    copy = tmp / "damaged"
    shutil.copytree(adapter, copy)
    damage(copy)
    return copy


def _truncate(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def _failed_summary() -> Callable[[Path], None]:
    """What the ServerApp writes when every round lost every reply (a writer of it)."""
    from server.report import outcome

    rows = [{"round": r, "replied": 0, "aggregated": False,
             "reasons": ["node 7: client error: RuntimeError: simulated dropout of site 0"]}
            for r in (1, 2)]
    summary = {"test_accuracy": 0.167, **outcome(rows, load_config(["strategy.rounds=2"])
                                                  .strategy)}

    def write(out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary))
    return write


def _train_whose_rounds_all_failed(tmp: Path, mp: pytest.MonkeyPatch, _: Path,
                                   __: Path) -> list[str]:
    import launcher.deployment
    import launcher.prepare
    from launcher.flwr_cli import FlowerRun

    write = _failed_summary()

    def train(cfg, **_kwargs):
        write(Path(cfg.output_dir))
        return FlowerRun(run_id=1, status="finished:completed")
    mp.setattr(launcher.prepare, "prepare", lambda cfg: cfg)
    mp.setattr(launcher.deployment, "train", train)
    return ["train", "--insecure", f"output_dir={tmp / 'run'}"]


def _train_whose_serverapp_failed(tmp: Path, mp: pytest.MonkeyPatch, _: Path,
                                  __: Path) -> list[str]:
    import launcher.deployment
    import launcher.prepare
    from launcher.flwr_cli import FlowerRun

    failed = FlowerRun(run_id=3, status="finished:failed", log_path=tmp / "flower.log",
                       details="ServerApp failed with exception: checkpoint\nnot written")
    mp.setattr(launcher.prepare, "prepare", lambda cfg: cfg)
    mp.setattr(launcher.deployment, "train", lambda cfg, **_kwargs: failed)
    return ["train", "--insecure", f"output_dir={tmp / 'run'}"]


ROOT = Path(__file__).resolve().parents[2]

# `python -m simulations.run` in a process of its own (Hydra's entry point takes over the
# process's streams), with Flower's run replaced by one whose every round lost every reply
FAKED_SIMULATION = """
import sys
import simulations.federation as federation
import simulations.run as run
from launcher.flwr_cli import FlowerRun
from tests.faults.test_probes import _failed_summary

write = _failed_summary()


def run_app(*_args, log_path, **_kwargs):
    write(log_path.parent)
    return FlowerRun(run_id=1, status="finished:completed", log_path=log_path)


federation.prepare, federation.run_app = (lambda cfg: cfg), run_app
sys.argv = ["simulations.run", *sys.argv[1:]]
run.main()
"""


def _simulation_whose_rounds_all_failed(tmp: Path, mp: pytest.MonkeyPatch, _: Path,
                                        __: Path) -> list[str]:
    return ["simulate", f"output_dir={tmp / 'run'}"]


def _args(*argv: str) -> Callable[..., list[str]]:
    def build(tmp: Path, mp: pytest.MonkeyPatch, adapter: Path, data: Path) -> list[str]:
        return [a.format(tmp=tmp, adapter=adapter, data=data) for a in argv]
    return build


def _with_adapter(damage: Callable[[Path], None], *argv: str) -> Callable[..., list[str]]:
    def build(tmp: Path, mp: pytest.MonkeyPatch, adapter: Path, data: Path) -> list[str]:
        return _args(*argv)(tmp, mp, _damaged_copy(adapter, tmp, damage), data)
    return build


def _without_gpu(*argv: str) -> Callable[..., list[str]]:
    def build(tmp: Path, mp: pytest.MonkeyPatch, adapter: Path, data: Path) -> list[str]:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        return _args(*argv)(tmp, mp, adapter, data)
    return build


def _a_file_named(name: str, build: Callable[..., list[str]]) -> Callable[..., list[str]]:
    def wrapped(tmp: Path, mp: pytest.MonkeyPatch, adapter: Path, data: Path) -> list[str]:
        (tmp / name).write_text("a file, not a folder")
        return build(tmp, mp, adapter, data)
    return wrapped


PREDICT = ("predict", "--adapter", "{adapter}", "--data", "{data}", "--out", "{tmp}/p.csv")
COMMAND_PROBES: list[tuple[str, Callable[..., list[str]], str]] = [
    ("predict with a truncated adapter file", _with_adapter(_truncate, *PREDICT),
     "damaged/adapter_model.safetensors: truncated or corrupt (Error while deserializing header"),
    ("evaluate without the adapter file",
     _with_adapter(lambda f: (f / "adapter_model.safetensors").unlink(), "evaluate", "--adapter",
                   "{adapter}", "--data", "{data}"),
     "damaged/adapter_model.safetensors: missing (the adapter's weights)"),
    ("evaluate without labels.json",
     _with_adapter(lambda f: (f / "labels.json").unlink(), "evaluate", "--adapter", "{adapter}",
                   "--data", "{data}"),
     "damaged/labels.json: missing (the label names saved with the adapter)"),
    ("export without labels.json",
     _with_adapter(lambda f: (f / "labels.json").unlink(), "export", "--adapter", "{adapter}",
                   "--merge", "--out", "{tmp}/served"),
     "damaged/labels.json: missing"),
    ("predict --out under a file",
     _a_file_named("runs", _args(*PREDICT[:-1], "{tmp}/runs/p.csv")),
     "/runs/p.csv: cannot write this file ("),
    ("evaluate --out under a file",
     _a_file_named("runs", _args("evaluate", "--adapter", "{adapter}", "--data", "{data}",
                                 "--out", "{tmp}/runs/scores.json")),
     "/runs/scores.json: cannot write this file ("),
    ("export --out under a file",
     _a_file_named("runs", _args("export", "--adapter", "{adapter}", "--merge", "--out",
                                 "{tmp}/runs/served")),
     "/runs/served: not a writable folder ("),
    ("predict --device cuda without a gpu", _without_gpu(*PREDICT, "--device", "cuda"),
     "--device=cuda: no usable GPU"),
    ("train: every round lost every reply", _train_whose_rounds_all_failed,
     "fedmm train: run failed: 0 of 2 rounds aggregated an update, fewer than "
     "strategy.min_completed_rounds=2: round 1: node 7: client error: RuntimeError: simulated "
     "dropout of site 0; round 2:"),
    ("train: the ServerApp failed", _train_whose_serverapp_failed,
     "fedmm train: run 3 did not complete: finished:failed ServerApp failed with exception: "
     "checkpoint not written"),
    ("simulation: every round lost every reply", _simulation_whose_rounds_all_failed,
     "fedmm: run failed: 0 of 2 rounds aggregated an update"),
]


@pytest.mark.parametrize("build,expected", [p[1:] for p in COMMAND_PROBES],
                         ids=[p[0] for p in COMMAND_PROBES])
def test_command_fails_with_one_line_and_a_nonzero_exit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        adapter_and_data: tuple[Path, Path], build: Callable[..., list[str]],
        expected: str) -> None:
    argv = build(tmp_path, monkeypatch, *adapter_and_data)
    if argv[0] == "simulate":  # python -m simulations.run OVERRIDES, Flower's run faked
        proc = subprocess.run([sys.executable, "-c", FAKED_SIMULATION, *argv[1:]],
                              capture_output=True, text=True, cwd=ROOT)
        code, line = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
    else:
        from launcher.cli import main

        code, line = main(argv), capsys.readouterr().err.strip()
    assert code != 0
    assert expected in line, line
    assert "\n" not in line and "Traceback" not in line
