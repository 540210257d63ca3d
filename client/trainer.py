"""A site's warm trainer: one long-lived process that handles the messages its ClientApp relays.

    python -m client.trainer --socket /tmp/fedmm-site/trainer.sock --parent-pid PID

`fedmm site` starts it beside the SuperNode (it exits when that process does). It imports
client/app.py once, so torch, the backbone (common.task.cached_bundle), the site's encoded data
and its cached stems stay loaded across messages and rounds; each `flwr-clientapp` that Flower
starts per message only relays to it (client/warm.py). Messages are served one at a time, by
the same handlers, with the same seeds: results are those of a cold process. When a run's app
is other code than this process's, the trainer declines the message (the relay handles it
in-process) and restarts itself on the run's code, so later messages are warm again.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from client.timing import relayed
from client.warm import code_digest, receive, send

log = logging.getLogger("fedmm.client")


def serve(path: Path, parent_pid: int | None = None) -> None:
    """Listen on `path` and handle relayed messages until the parent process exits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)  # relays queue here while the imports below run
    if parent_pid:
        threading.Thread(target=_exit_with, args=(parent_pid, path), daemon=True).start()
    import client.app  # torch, transformers, PEFT: once for every message to come

    loaded = Path(client.app.__file__).resolve().parent.parent
    app, digest = client.app.app, code_digest(loaded)
    print(f"[fedmm] site trainer ready on {path} (pid {os.getpid()})", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                wanted = handle(conn, app, digest)
            except (OSError, ValueError) as err:  # a relay that went away, a bad frame
                log.warning("site trainer: dropped a relay: %s", err)
                wanted = None
        if wanted is not None and wanted.resolve() != loaded and wanted.is_dir():
            server.close()
            _restart(path, parent_pid, wanted)


def handle(conn: socket.socket, app, digest: str) -> Path | None:
    """Serve one relayed message; the run's app folder if this process runs other code."""
    from flwr.common.serde import (context_from_proto, context_to_proto, message_from_proto,
                                   message_to_proto)
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
    from flwr.supercore.task_identity import TaskIdentity

    header, blobs = receive(conn)
    if header["digest"] != digest:
        send(conn, {"mismatch": True}, [])
        return Path(header["app_dir"])
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = header["task"]
    msg = message_from_proto(ProtoMessage.FromString(blobs[0]))
    context = context_from_proto(ProtoContext.FromString(blobs[1]))
    try:
        with relayed(float(header["started"])):
            reply = app(msg, context)
    except Exception as err:  # noqa: BLE001 - the relay raises it as the ClientApp's error
        traceback.print_exc()
        send(conn, {"error": f"{type(err).__name__}: {err}"}, [])
        return None
    send(conn, {"ok": True}, [message_to_proto(reply).SerializeToString(),
                              context_to_proto(context).SerializeToString()])
    return None


def _exit_with(parent_pid: int, path: Path) -> None:
    """End this process soon after `parent_pid` (the site's SuperNode) is gone."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    path.unlink(missing_ok=True)
    os._exit(0)


def _restart(path: Path, parent_pid: int | None, app_dir: Path) -> None:
    """Replace this process by a trainer that imports the code in `app_dir` first."""
    print(f"[fedmm] site trainer: restarting on the run's app in {app_dir}", flush=True)
    argv = [sys.executable, "-c", RESTART, str(app_dir), "--socket", str(path)] + (
        ["--parent-pid", str(parent_pid)] if parent_pid else [])
    os.execv(sys.executable, argv)


RESTART = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "  # the app's packages come first
           "from client.trainer import main; main(sys.argv[1:])")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--socket", required=True, help="Unix socket to listen on")
    p.add_argument("--parent-pid", type=int, help="exit when this process exits")
    args = p.parse_args(argv)
    serve(Path(args.socket), args.parent_pid)


if __name__ == "__main__":
    main()
