"""Site-updates per minute of a simulation worker: with its caches vs rebuilding per message.

    python -m benchmarks.throughput [--sites 3] [--federations default small] [--threads 2]

A simulation worker (a Ray actor) is long-lived: common.task.cached_bundle builds the backbone
once and the site's encoded data and cached stems are kept between its messages. This calls the
real ClientApp (client/warm.py, as Flower does) on real train Messages for `--sites` sites of
the default task in each of `--federations` (FEDERATIONS: the default 10 sites, ~200 rows a
site; 100 IID sites of ~20 rows, the many small sites of central DP), after a first message has
filled the caches, three ways:
    cached           as in a simulation
    rebuild          the backbone rebuilt for every message (data and stems still cached)
    rebuild + data   backbone, encoded data and stems rebuilt for every message: what a
                     process that keeps nothing pays, short of its imports
One JSON line per (federation, way): seconds per site-update (median), site-updates per minute,
and the ratio of the cached rate to it (goal >= 3x for what the cache saves).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import common.task
from benchmarks.measure import emit
from client.warm import app
from common import keys
from common.adapter import adapter_state, to_numpy
from common.config import Config, load_config, to_json
from common.task import cached_bundle, resolve_data

WAYS = ("cached", "rebuild", "rebuild + data")
FEDERATIONS = {"default": [], "small": ["partition=iid", "partition.num_clients=100"]}


def message(initial: dict, server_round: int) -> Message:
    record = ArrayRecord({k: Array(v.copy()) for k, v in initial.items()})
    return Message(RecordDict({keys.ARRAYS: record, keys.CONFIG: ConfigRecord(
        {keys.SERVER_ROUND: server_round})}), dst_node_id=1, message_type="train")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--federations", nargs="+", choices=list(FEDERATIONS),
                   default=list(FEDERATIONS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    for name in args.federations:
        measure(resolve_data(load_config(FEDERATIONS[name])), args.sites)


def measure(cfg: Config, sites: int) -> None:
    """The three ways for `sites` sites of the federation `cfg`; one JSON line per way."""
    initial = to_numpy(adapter_state(cached_bundle(cfg.model, cfg.data.labels).model))
    contexts = [Context(run_id=1, node_id=1, node_config={
        keys.PARTITION_ID: site, keys.NUM_PARTITIONS: cfg.partition.num_clients},
        state=RecordDict(), run_config={keys.RUN_CONFIG: to_json(cfg)})
        for site in range(sites)]
    rows = [int(app(message(initial, 1), context).content[keys.METRICS][keys.NUM_EXAMPLES])
            for context in contexts]  # (fills the data and stem caches of every site once)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for context in contexts:  # interleaved, so the machine's other load hits each way alike;
        for way in reversed(WAYS):  # (rebuild + data first: it empties every site's cache)
            if way != "cached":
                common.task._BUNDLES.clear()
            if way == "rebuild + data":
                common.task._site_data.cache_clear()
            start = time.perf_counter()
            reply = app(message(initial, 2), context)
            seconds[way].append(time.perf_counter() - start)
            assert not reply.has_error()
    cached = statistics.median(seconds["cached"])
    for way in WAYS:
        per_update = statistics.median(seconds[way])
        emit(figure="simulation throughput", federation_sites=cfg.partition.num_clients,
             rows_per_site=round(statistics.mean(rows)), way=way, measured_sites=sites,
             seconds_per_site_update=round(per_update, 3),
             site_updates_per_minute=round(60 / per_update, 2),
             cached_speedup=round(per_update / cached, 2),
             goal=">= 3x" if way != "cached" else None)


if __name__ == "__main__":
    main()
