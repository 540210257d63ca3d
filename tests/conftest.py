"""Shared fixtures: tiny real models (built from config, saved to disk) and small datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dataclasses import replace

from common.config import Config, TrainConfig, load_config
from common.encoded import Clips, Encoded
from common.towers.text import EMBEDDED_TEXT, resolve_name_or_path

torch.set_num_threads(2)
LABELS = ["a", "b", "c"]


@pytest.fixture(scope="session")
def default_cfg() -> Config:
    """The packaged defaults as a run on the (image + text) demo resolves them."""
    return load_config(["model.modalities=[image,text]"])


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A tiny BERT saved to disk with the embedded tokenizer: a real HF `name_or_path`."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    src = Path(resolve_name_or_path(next(iter(EMBEDDED_TEXT))))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A tiny ViT saved to disk: a pretrained-style vision tower that gets LoRA."""
    from transformers import ViTConfig, ViTModel

    out = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(out)
    return out


def train_options(**changes) -> TrainConfig:
    """The packaged local-training options with `changes` (e.g. epochs=2, lr=1e-2)."""
    return replace(load_config([]).train, **changes)


def strategy_cfg(name: str = "fedavg", lora_alpha: float | None = None,
                 overrides: tuple[str, ...] = (), **strategy_changes) -> Config:
    """A whole config for strategy `name`: one site suffices, `strategy_changes` applied."""
    cfg = load_config([f"strategy={name}", *overrides])
    changes = {"min_train_nodes": 1, "min_available_nodes": 1, **strategy_changes}
    cfg = replace(cfg, strategy=replace(cfg.strategy, **changes))
    if lora_alpha is not None:
        cfg = replace(cfg, model=replace(cfg.model, lora=replace(cfg.model.lora,
                                                                 alpha=lora_alpha)))
    return cfg


class NodeGrid:
    """The part of Flower's Grid that strategies' configure_* read: the connected node ids."""

    def __init__(self, node_ids=(1,)):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def start_round(strategy, server_round: int, global_state: dict, node_ids=(1,)) -> list:
    """Run the strategy's real configure_train for a round that starts from `global_state`."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({k: Array(v.copy()) for k, v in global_state.items()})
    return list(strategy.configure_train(server_round, arrays, ConfigRecord(), NodeGrid(node_ids)))


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    """A tiny Whisper encoder (2 layers, width 16) saved to disk: a real HF audio tower."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    out = tmp_path_factory.mktemp("tiny-whisper")
    config = WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2,
                           encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2,
                           decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=1500,
                           architectures=["WhisperEncoder"])
    torch.manual_seed(0)
    WhisperEncoder(config).save_pretrained(out)
    return out


def tiny_overrides(text_dir: Path, vision_dir: Path | None = None,
                   audio_dir: Path | None = None, modalities: str | None = "image,text"
                   ) -> list[str]:
    """Hydra overrides that swap in the tiny towers (the small CNN unless `vision_dir`), for a
    model of `modalities` (audio needs `audio_dir`; None: the training manifest's)."""
    out = ["model=minilm_cnn", f"model.text.name_or_path={text_dir}", "model.fusion_dim=16"]
    if modalities is not None:
        out.append(f"model.modalities=[{modalities}]")
    if vision_dir is not None:
        out.append(f"model.vision.name_or_path={vision_dir}")
    if audio_dir is not None:
        out.append(f"model.audio.name_or_path={audio_dir}")
    return out


def random_batch(n: int, num_labels: int = len(LABELS), seed: int = 0,
                 modalities: tuple[str, ...] = ("image", "text"), frames: int = 100
                 ) -> Encoded:
    """Random images, random log-mel clips (`frames` long, the last rows' second half padding)
    and short texts whose first word decides the label (learnable)."""
    g = torch.Generator().manual_seed(seed)
    words = ["stable", "growing", "unchanged", "larger", "same", "expanding"]
    ids = torch.randint(0, len(words), (n, 5), generator=g)
    texts = [" ".join(words[int(i)] for i in row) for row in ids]
    mask = torch.ones(n, frames, dtype=torch.bool)
    mask[n // 2:, frames // 2:] = False
    inputs = {"image": torch.randn(n, 3, 32, 32, generator=g), "text": texts,
              "audio": Clips(torch.randn(n, 80, frames, generator=g), mask)}
    return Encoded(ids[:, 0] % num_labels, {m: inputs[m] for m in modalities})


@pytest.fixture
def flower_task_identity():
    """Give this process the identity a Flower task process has, so Messages can be built."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def assert_reloads_to_identical_logits(bundle, data: Encoded, folder: Path) -> None:
    """Save `bundle`'s adapter, load it with PeftModel.from_pretrained on a fresh backbone, and
    require the very same logits on `data`."""
    from peft import PeftModel

    from common.model import build_backbone, save_adapter
    from common.train import predict

    expected = predict(bundle, data)
    save_adapter(bundle, folder)
    backbone, _ = build_backbone(bundle.cfg, len(bundle.label_names))
    reloaded = PeftModel.from_pretrained(backbone, str(folder))
    torch.testing.assert_close(predict(type(bundle)(reloaded, bundle.label_names, bundle.cfg),
                                       data), expected, rtol=0, atol=0)
