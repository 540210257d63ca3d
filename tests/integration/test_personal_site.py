"""Personal adapters at a site, through the real ClientApp handlers (tiny towers, real PEFT).

FedSA-LoRA: B never leaves the site and is put back over each round's global adapter; Ditto:
the global update a site sends is exactly the one it sends without Ditto, while its personal v
is kept in its Context; the last round's evaluate reports and saves the personal adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import app as client_app
from client.personal import LORA_B, PERSONAL_STATE, before_train
from client.site import load_site
from common import keys
from common.adapter import adapter_state
from common.config import load_config, to_json
from common.model import load_adapter
from common.task import cached_bundle, resolve_data, site_data
from common.train import evaluate
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("flower_task_identity")
NODE = {keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 2}


def _cfg(tmp_path, tiny_text_dir, mode: str):
    return resolve_data(load_config([
        *tiny_overrides(tiny_text_dir), f"data.demo_dir={tmp_path / 'demo'}",
        "data.demo_train=60", "data.demo_test=10", "partition=iid", "partition.num_clients=2",
        "partition.min_partition_size=5", "train.epochs=1", "strategy.rounds=2",
        f"personalization={mode}", f"output_dir={tmp_path / mode}"]))


def _send(cfg, kind: str, state: dict, context: Context, server_round: int) -> Message:
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: v.clone() for k, v in state.items()}),
                          keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
    reply = client_app(Message(content, dst_node_id=7, message_type=kind), context)
    assert not reply.has_error(), reply.error
    return reply


def _context(cfg) -> Context:
    return Context(run_id=1, node_id=7, node_config=NODE, state=RecordDict(),
                   run_config={keys.RUN_CONFIG: to_json(cfg)})


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("personal")


def test_fedsa_keeps_b_at_the_site_and_puts_it_back_each_round(tmp, tiny_text_dir):
    cfg = _cfg(tmp, tiny_text_dir, "fedsa")
    bundle = cached_bundle(cfg.model, cfg.data.labels)
    initial = adapter_state(bundle.model)
    context = _context(cfg)
    sent = _send(cfg, "train", initial, context, 1).content[keys.ARRAYS]
    b_keys = {k for k in initial if LORA_B in k}
    assert b_keys and set(sent.keys()) == set(initial) - b_keys  # B never sent
    own = {k: v.numpy() for k, v in context.state[PERSONAL_STATE].items()}
    assert set(own) == b_keys and any(np.abs(v).sum() > 0 for v in own.values())
    msg = Message(RecordDict({keys.ARRAYS: ArrayRecord(initial),
                              keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 2})}),
                  dst_node_id=7, message_type="train")
    site = load_site(msg, context)
    before_train(site, context)
    state = adapter_state(site.bundle.model)
    for k in initial:
        expected = own[k] if k in b_keys else initial[k].numpy()
        np.testing.assert_array_equal(state[k].numpy(), expected, err_msg=k)
    metrics = _send(cfg, "evaluate", initial, context, 2).content[keys.METRICS]
    personal = load_adapter(cfg.model, tmp / "fedsa" / "sites" / "site-0" / "personal-adapter")
    held_out = site_data(cfg, train_manifest=cfg.data.train, partition_id=0)[1]
    assert metrics[keys.PERSONAL_ACCURACY] == evaluate(personal, held_out)["accuracy"]
    saved = adapter_state(personal.model)
    for k in b_keys:
        np.testing.assert_array_equal(saved[k].numpy(), own[k], err_msg=k)


def test_ditto_sends_the_plain_update_and_keeps_its_personal_adapter(tmp, tiny_text_dir):
    plain, ditto = (_cfg(tmp, tiny_text_dir, m) for m in ("none", "ditto"))
    initial = adapter_state(cached_bundle(plain.model, plain.data.labels).model)
    context = _context(ditto)
    sent = {cfg.personalization.name: _send(cfg, "train", initial, ctx, 1).content[keys.ARRAYS]
            for cfg, ctx in ((plain, _context(plain)), (ditto, context))}
    for k in initial:
        np.testing.assert_array_equal(sent["ditto"][k].numpy(), sent["none"][k].numpy(), k)
    personal = {k: v.numpy() for k, v in context.state[PERSONAL_STATE].items()}
    assert set(personal) == set(initial)
    assert any(not np.array_equal(personal[k], sent["ditto"][k].numpy()) for k in initial)
    metrics = _send(ditto, "evaluate", initial, context, 2).content[keys.METRICS]
    saved = load_adapter(ditto.model, tmp / "ditto" / "sites" / "site-0" / "personal-adapter")
    held_out = site_data(ditto, train_manifest=ditto.data.train, partition_id=0)[1]
    assert metrics[keys.PERSONAL_ACCURACY] == evaluate(saved, held_out)["accuracy"]
    assert keys.PERSONAL_ACCURACY not in _send(ditto, "evaluate", initial, context,
                                               1).content[keys.METRICS]  # not the last round
