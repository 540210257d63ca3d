"""The warm site trainer: a real `python -m client.trainer` process behind the ClientApp relay.

What the relay returns must be what the ClientApp itself returns for the same message (arrays
bit for bit), the site's Context must come back across rounds (top-k residuals), and a
trainer's error must surface as the ClientApp's.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.compression import RESIDUAL_STATE
from client.warm import APP_DIR, app as warm_app, code_digest, relay
from common import keys
from common.adapter import adapter_state
from common.config import load_config, to_json
from common.task import cached_bundle, resolve_data
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_text_dir):
    root = tmp_path_factory.mktemp("warm")
    cfg = resolve_data(load_config(tiny_overrides(tiny_text_dir) + [
        f"data.demo_dir={root / 'demo'}", "data.demo_train=60", "data.demo_test=20",
        "partition.num_clients=2", "partition.min_partition_size=5", "train.epochs=1",
        "strategy.compression=topk"]))
    initial = {k: v.numpy() for k, v in adapter_state(cached_bundle(
        cfg.model, cfg.data.labels).model).items()}
    return cfg, initial


@pytest.fixture(scope="module")
def trainer():
    folder = Path(tempfile.mkdtemp(prefix="fedmm-test-"))  # short: a Unix socket path
    path = folder / "trainer.sock"
    proc = subprocess.Popen([sys.executable, "-m", "client.trainer", "--socket", str(path)],
                            stdout=subprocess.PIPE, text=True, cwd=APP_DIR)
    try:
        line = proc.stdout.readline()  # blocks until the trainer has imported the app
        assert "site trainer ready" in line, line
        yield path
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _message(initial: dict, kind: str = "train", server_round: int = 1) -> Message:
    arrays = ArrayRecord({k: Array(v.copy()) for k, v in initial.items()})
    content = RecordDict({keys.ARRAYS: arrays,
                          keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
    return Message(content, dst_node_id=7, message_type=kind)


def _context(cfg, socket_path: Path | None = None) -> Context:
    node = {keys.PARTITION_ID: 1, keys.NUM_PARTITIONS: 2}
    if socket_path is not None:
        node[keys.TRAINER_SOCKET] = str(socket_path)
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                   run_config={keys.RUN_CONFIG: to_json(cfg)})


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    assert not reply.has_error(), reply.error
    return {k: v.numpy() for k, v in reply.content[keys.ARRAYS].items()}


def test_relayed_rounds_equal_in_process_rounds_bit_for_bit(setup, trainer):
    cfg, initial = setup
    warm_ctx, local_ctx = _context(cfg, trainer), _context(cfg)
    for server_round in (1, 2):  # round 2 starts from the residual round 1 left in the Context
        warm = warm_app(_message(initial, server_round=server_round), warm_ctx)
        local = warm_app(_message(initial, server_round=server_round), local_ctx)
        a, b = _arrays(warm), _arrays(local)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert RESIDUAL_STATE in warm_ctx.state.array_records
        for key in (keys.NUM_EXAMPLES, keys.TRAIN_LOSS):
            assert warm.content[keys.METRICS][key] == local.content[keys.METRICS][key]
        assert warm.content[keys.METRICS][keys.SITE_STARTUP] >= 0
        assert warm.metadata.reply_to_message_id == local.metadata.reply_to_message_id
    evaluated = warm_app(_message(initial, "evaluate"), warm_ctx)
    assert keys.EVAL_ACCURACY in evaluated.content[keys.METRICS]


def test_a_trainer_error_is_the_client_apps_error(setup, trainer):
    cfg, initial = setup
    bad = {k: v for k, v in list(initial.items())[1:]}  # a key missing: the adapter refuses it
    with pytest.raises(RuntimeError, match="site trainer: AdapterMismatch"):
        warm_app(_message(bad), _context(cfg, trainer))


def test_other_code_or_no_trainer_runs_the_message_here(setup, trainer, tmp_path):
    cfg, initial = setup
    assert relay(str(trainer), _message(initial), _context(cfg, trainer), "other") is None
    assert code_digest(APP_DIR) != "other"
    reply = warm_app(_message(initial), _context(cfg, tmp_path / "nobody.sock"))
    assert _arrays(reply)  # handled in-process, with a warning
