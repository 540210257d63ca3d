"""No modality alone or in pairs solves the three-modality demo task; all three fused do.

The task's 12 classes are shape (seen only in the image) × status (read only in the text) ×
tone (heard only in the sound), so a pair can tell at most half of them apart (image+text,
image+audio) or a third (text+audio). Each model is trained the same way (same rows, optimizer,
steps) through the same code path: the default pretrained towers, frozen (computed once per row,
`common/stems.py`), under the fusion head, which is what learns here.
"""

from __future__ import annotations

import pytest

from common.config import load_config
from common.data import encode, label_names, load_manifest
from common.demo_data import generate
from common.model import build_model
from common.task import input_encoding
from common.train import evaluate, train_local
from tests.conftest import train_options

EPOCHS = 20  # only the fusion head learns: cheap epochs
FROZEN = [f"model.{tower}.target_modules=[]" for tower in ("text", "vision", "audio")]
PAIR_BOUNDS = {"image,text": 1 / 2, "image,audio": 1 / 2, "text,audio": 1 / 3}


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory):
    train, test = generate(tmp_path_factory.mktemp("demo"), 480, 192, seed=3, audio=True)
    train_ds, test_ds = load_manifest(train)[0], load_manifest(test)[0]
    names = label_names(train_ds)
    encoding = input_encoding(load_config(["model.modalities=[image,text,audio]"]).model)
    # encoded once: every model reads its towers' rows, and shares the towers' cached outputs
    train_data, test_data = (encode(ds, names, encoding) for ds in (train_ds, test_ds))

    def trained(modalities: str) -> float:
        cfg = load_config([f"model.modalities=[{modalities}]", *FROZEN])
        bundle = build_model(cfg.model, names)
        train_local(bundle, train_data, train_options(epochs=EPOCHS, batch_size=16, lr=1e-2),
                    seed=0)
        return evaluate(bundle, test_data)["accuracy"]

    return trained


def test_all_three_modalities_beat_every_pair_by_a_wide_margin(accuracy):
    fused = accuracy("image,text,audio")
    pairs = {pair: accuracy(pair) for pair in PAIR_BOUNDS}
    print(f"all three {fused:.3f}", " ".join(f"{p} {a:.3f}" for p, a in pairs.items()))
    for pair, accuracy_ in pairs.items():  # what a pair can know, plus the test split's luck
        assert accuracy_ <= PAIR_BOUNDS[pair] + 0.08, (pair, accuracy_)
    assert fused >= max(pairs.values()) + 0.25, (fused, pairs)
