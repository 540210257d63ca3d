"""The real ClientApp handlers, called with real Flower Messages and Contexts."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

import common.task
from client.app import app as client_app
from common import keys
from common.adapter import AdapterMismatch, adapter_state
from common.config import load_config, to_json
from common.data import load_manifest
from common.model import backbone_bytes
from common.partition import partition_indices
from common.task import cached_bundle, resolve_data, site_data
from common.train import predict

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    demo = tmp_path_factory.mktemp("demo")
    cfg = resolve_data(load_config([f"data.demo_dir={demo}", "data.demo_train=120",
                                    "data.demo_test=30", "partition.num_clients=3",
                                    "partition.min_partition_size=5"]))
    train, labels = cfg.data.train, cfg.data.labels
    bundle = cached_bundle(cfg.model, labels)
    initial = {k: v.clone() for k, v in adapter_state(bundle.model).items()}
    return cfg, train, labels, initial


def _message(cfg, train, labels, initial, kind: str, server_round: int = 1) -> Message:
    config = ConfigRecord({keys.SERVER_ROUND: server_round})  # all else is in the run config
    content = RecordDict({keys.ARRAYS: ArrayRecord(initial), keys.CONFIG: config})
    return Message(content, dst_node_id=7, message_type=kind)


def _context(cfg, node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={keys.RUN_CONFIG: to_json(cfg)})


def test_train_replies_with_only_the_adapter_within_the_upload_cap(setup):
    cfg, train, labels, initial = setup
    node = {keys.PARTITION_ID: 1, keys.NUM_PARTITIONS: 3}
    reply = client_app(_message(cfg, train, labels, initial, "train"), _context(cfg, node))
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    arrays = reply.content[keys.ARRAYS]
    bundle = cached_bundle(cfg.model, labels)
    frozen = {n for n, p in bundle.model.named_parameters() if not p.requires_grad}
    assert set(arrays.keys()) == set(initial)
    assert not set(arrays.keys()) & frozen
    # the upload cap of the default model (LoRA + projected head): ~1% of the backbone's bytes
    assert arrays.count_bytes() <= min(1_500_000, 0.015 * backbone_bytes(bundle.model))
    moved = [k for k in initial if not np.array_equal(arrays[k].numpy(), initial[k].numpy())]
    assert moved, "training changed no tensor"
    metrics = reply.content[keys.METRICS]
    parts = partition_indices(load_manifest(train)[0], cfg.partition, cfg.seed)
    assert metrics[keys.NUM_EXAMPLES] == len(parts[1]) - round(len(parts[1]) * 0.1)
    assert np.isfinite(metrics[keys.TRAIN_LOSS])


def test_deployed_site_reads_its_manifest_from_node_config(setup, capsys):
    cfg, train, labels, initial = setup
    reply = client_app(_message(cfg, train, labels, initial, "train"),
                       _context(cfg, {keys.DATA_PATH: str(train)}))
    assert not reply.has_error()
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 120 - 12  # all rows, 10% held out
    assert cfg.train.absent_class_scale < 1  # the default: the site's log says where it acts
    assert "restricted softmax (train.absent_class_scale=0.5) is inert here" in \
        capsys.readouterr().out


def test_a_deployed_site_lacking_a_class_says_restricted_softmax_acts_there(setup, capsys):
    cfg, train, labels, initial = setup
    with open(train, newline="") as f:
        rows = list(csv.DictReader(f))
    site = Path(train).with_name("lacking.csv")  # beside train.csv: its image paths resolve
    with site.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["label"] != labels[0])
    context = _context(cfg, {keys.DATA_PATH: str(site)})
    for server_round in (1, 2):
        reply = client_app(_message(cfg, train, labels, initial, "train", server_round), context)
        assert not reply.has_error()
    out = capsys.readouterr().out
    assert out.count("restricted softmax") == 1  # once per run, not every round
    assert f"[fedmm] site lacking: restricted softmax (train.absent_class_scale=0.5) acts " \
           f"here: this site lacks {labels[0]}" in out


def test_evaluate_reports_loss_and_accuracy_on_held_out_rows(setup):
    cfg, train, labels, initial = setup
    reply = client_app(_message(cfg, train, labels, initial, "evaluate"),
                       _context(cfg, {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}))
    metrics = reply.content[keys.METRICS]
    bundle = cached_bundle(cfg.model, labels)
    held_out = site_data(cfg, train_manifest=train, partition_id=0)[1]
    parts = partition_indices(load_manifest(train)[0], cfg.partition, cfg.seed)
    assert metrics[keys.NUM_EXAMPLES] == len(held_out) == round(len(parts[0]) * 0.1)
    logits = predict(bundle, held_out).numpy()  # the global adapter is still loaded
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    truth = held_out.labels.numpy()
    assert metrics[keys.EVAL_LOSS] == pytest.approx(-log_p[np.arange(len(truth)), truth].mean(),
                                                    rel=1e-5)
    assert metrics[keys.EVAL_ACCURACY] == pytest.approx((logits.argmax(-1) == truth).mean())


def test_backbone_is_built_once_across_rounds_and_sites(setup, monkeypatch):
    cfg, train, labels, initial = setup
    builds = []
    real_build = common.task.build_model
    monkeypatch.setattr(common.task, "build_model",
                        lambda *a, **kw: builds.append(1) or real_build(*a, **kw))
    for server_round, partition in [(1, 0), (2, 1), (3, 2)]:
        reply = client_app(_message(cfg, train, labels, initial, "train", server_round),
                           _context(cfg, {keys.PARTITION_ID: partition, keys.NUM_PARTITIONS: 3}))
        assert not reply.has_error()
    assert builds == []  # the module fixture built it; three messages reused it


def test_a_global_adapter_of_the_wrong_shape_is_refused_before_training(setup):
    # Flower's runtime turns this exception into an error reply; the server counts it.
    cfg, train, labels, initial = setup
    bad = dict(initial)
    key = next(iter(bad))
    bad[key] = bad[key][:1].clone()
    with pytest.raises(AdapterMismatch, match="shape"):
        client_app(_message(cfg, train, labels, bad, "train"),
                   _context(cfg, {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}))


def test_ffa_site_keeps_a_frozen_and_does_not_send_it(setup):
    cfg, train, labels, initial = setup
    ffa = replace(cfg, strategy=replace(cfg.strategy, lora_aggregation="ffa"))
    msg = _message(ffa, train, labels, initial, "train")
    reply = client_app(msg, _context(ffa, {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}))
    sent = set(reply.content[keys.ARRAYS].keys())
    a_keys = {k for k in initial if ".lora_A." in k}
    assert a_keys and not sent & a_keys and sent == set(initial) - a_keys
    bundle = cached_bundle(cfg.model, labels)
    for k in a_keys:  # the site's A is still the global A
        np.testing.assert_array_equal(adapter_state(bundle.model)[k].numpy(), initial[k].numpy())


def test_exact_residuals_reach_the_base_weights_and_are_reset_after(setup):
    cfg, train, labels, initial = setup
    bundle = cached_bundle(cfg.model, labels)
    prefix = next(k for k in initial if ".lora_A." in k).split(".lora_A.")[0]
    layer = bundle.model.get_submodule(prefix)
    pretrained = layer.base_layer.weight.detach().clone()
    residual = np.full(tuple(pretrained.shape), 0.01, np.float32)
    msg = _message(cfg, train, labels, initial, "evaluate")
    msg.content[keys.BASE_RESIDUALS] = ArrayRecord({prefix: Array(residual)})
    client_app(msg, _context(cfg, {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}))
    np.testing.assert_allclose(layer.base_layer.weight.detach().numpy(),
                               pretrained.numpy() + residual, rtol=1e-6)
    client_app(_message(cfg, train, labels, initial, "evaluate"),
               _context(cfg, {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 3}))
    np.testing.assert_array_equal(layer.base_layer.weight.detach().numpy(), pretrained.numpy())


def test_a_site_of_another_rank_refits_the_global_adapter_and_replies_in_its_rank(setup):
    cfg, train, labels, initial = setup
    reply = client_app(_message(cfg, train, labels, initial, "train"),
                       _context(cfg, {keys.DATA_PATH: str(train), keys.LORA_RANK: 2}))
    arrays = reply.content[keys.ARRAYS]
    a_key = next(k for k in initial if ".lora_A." in k)
    b_key = a_key.replace(".lora_A.", ".lora_B.")
    assert arrays[a_key].numpy().shape[0] == 2 and arrays[b_key].numpy().shape[1] == 2


def test_three_modality_sites_report_each_modality_and_one_without_audio_keeps_its_tower(
        tmp_path, tiny_text_dir, tiny_whisper_dir):
    import csv

    from tests.conftest import tiny_overrides

    demo = tmp_path / "demo"
    cfg = resolve_data(load_config(tiny_overrides(tiny_text_dir, audio_dir=tiny_whisper_dir,
                                                  modalities="image,text,audio") + [
        f"data.demo_dir={demo}", "data.demo_train=48", "data.demo_test=12", "data.demo_audio=true",
        "partition.num_clients=2", "partition=iid", "skew.missing_audio_rate=0.25"]))
    assert len(cfg.data.labels) == 12
    initial = {k: v.clone() for k, v in adapter_state(cached_bundle(cfg.model,
                                                                    cfg.data.labels).model).items()}
    reply = client_app(_message(cfg, cfg.data.train, cfg.data.labels, initial, "train"),
                       _context(cfg, {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 2}))
    metrics = reply.content[keys.METRICS]
    train = site_data(cfg, train_manifest=cfg.data.train, partition_id=0)[0]
    assert metrics[keys.NUM_AUDIO_EXAMPLES] == int(train.has("audio").sum()) < len(train)
    assert metrics[keys.NUM_IMAGE_EXAMPLES] == metrics[keys.NUM_TEXT_EXAMPLES] == len(train)
    # A deployed site whose manifest has no audio column: no audio row, its tower unchanged.
    with open(cfg.data.train, newline="") as f:
        rows = [{k: v for k, v in r.items() if k != "audio"} for r in csv.DictReader(f)]
    silent = demo / "site-without-audio.csv"
    with open(silent, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    reply = client_app(_message(cfg, cfg.data.train, cfg.data.labels, initial, "train"),
                       _context(cfg, {keys.DATA_PATH: str(silent)}))
    assert not reply.has_error()
    assert reply.content[keys.METRICS][keys.NUM_AUDIO_EXAMPLES] == 0
    arrays = reply.content[keys.ARRAYS]
    audio_keys = [k for k in initial if "towers.audio" in k]
    assert audio_keys and all(np.array_equal(arrays[k].numpy(), initial[k].numpy())
                              for k in audio_keys)
