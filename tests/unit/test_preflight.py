"""Launch checks: each refuses one bad input with one line naming the file or key."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pytest
import torch

from common.config import ConfigError
from common.data import ManifestError
from common.preflight import check_device, check_test_labels, check_train_labels, check_writable


def _ds(labels: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": ["x.png"] * len(labels),
                                       "text": ["t"] * len(labels), "label": labels})


def test_test_labels_inside_training_pass() -> None:
    check_test_labels(["a", "b", "c"], _ds(["c", "a", "a"]), "test.csv")


def test_test_labels_absent_from_training_are_named_with_their_rows() -> None:
    test = _ds(["a", "zebra", "cow", "zebra", "b", "zebra"])
    with pytest.raises(ManifestError) as info:
        check_test_labels(["a", "b"], test, "/data/test.csv")
    msg = str(info.value)
    missing = sorted(set(test["label"]) - {"a", "b"})  # reference: plain set difference
    assert msg.startswith("/data/test.csv: 4 of 6 rows") and "\n" not in msg
    assert all(f"'{lab}'" in msg for lab in missing)
    assert "'zebra' (3 rows)" in msg and "'cow' (1 row)" in msg
    assert msg.index("'zebra'") < msg.index("'cow'")  # most rows first


def test_many_missing_labels_are_cut_to_a_few() -> None:
    labels = [f"l{i}" for i in range(40)]
    with pytest.raises(ManifestError, match=r"40 labels in all") as info:
        check_test_labels(["a"], _ds(labels), "t.csv")
    assert len(str(info.value)) < 300


def test_training_manifest_with_one_label_is_refused() -> None:
    check_train_labels(_ds(["a", "b"]), "train.csv")
    with pytest.raises(ManifestError, match=r"train\.csv: all 3 rows have the label 'a'"):
        check_train_labels(_ds(["a", "a", "a"]), "train.csv")


@pytest.mark.parametrize("setting", ["auto", "cpu"])
def test_auto_and_cpu_always_pass(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_device(setting)


@pytest.mark.parametrize("setting", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_fails_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                              setting: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"^device={setting}: no usable GPU") as info:
        check_device(setting)
    assert "\n" not in str(info.value)


def test_cuda_with_a_gpu_passes_and_a_missing_index_fails(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"device=cuda:2: this machine has 2 GPU"):
        check_device("cuda:2")
    with pytest.raises(ConfigError, match=r"device must be one of"):
        check_device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_passes_on_a_real_gpu() -> None:
    check_device("cuda")
    check_device(f"cuda:{torch.cuda.device_count() - 1}")


def test_missing_output_folder_is_created_and_left_clean(tmp_path: Path) -> None:
    out = check_writable(tmp_path / "runs" / "a")
    assert out == (tmp_path / "runs" / "a").resolve() and out.is_dir()
    assert list(out.iterdir()) == []


def test_output_folder_under_a_file_names_the_key_and_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for folder in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ConfigError, match=rf"^output_dir={folder}: not a writable folder"):
            check_writable(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"ro: not a writable folder \(Permission denied\)"):
        check_writable(ro, key="baselines_dir")


def test_read_only_filesystem_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    def refuse(**_: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(ConfigError, match=r"^runs_dir=.*out: not a writable folder \(Read-only"):
        check_writable(tmp_path / "out", key="runs_dir")
