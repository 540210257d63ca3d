"""The ClientApp Flower loads at a site: a relay to the site's warm trainer, or the app itself.

Flower 1.42 starts one `flwr-clientapp` process per message, so a cold site re-imports torch,
rebuilds the backbone and recomputes its cached stems for every message. A site started with
`fedmm site` (warm by default) also runs a trainer process (client/trainer.py) that keeps all
of that loaded; its node config names the trainer's Unix socket (`trainer-socket`). This module,
torch-free, is what each `flwr-clientapp` imports: it hands the message and the site's Context
to the trainer and returns the trainer's reply and Context, so Flower stays the only transport
and control plane between the site and the server, and the trainer runs the very same
client/app.py handlers (mods included). Without a trainer, or when the trainer runs other code
than the run's app, the message is handled here, in-process, exactly as before.

Wire format over the socket (one request, one response per connection): an 8-byte length and a
JSON header, then two 8-byte-length blobs: the Message and the Context as Flower's protobufs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import struct
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, \
    message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.supercore.task_identity import TaskIdentity

from common import keys
from client.timing import message_started

log = logging.getLogger("fedmm.client")
CODE_DIRS = ("client", "common", "server")  # what decides how a message is handled
APP_DIR = Path(__file__).resolve().parent.parent  # this copy of the app (the run's FAB)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return handle(msg, context)


def handle(msg: Message, context: Context) -> Message:
    """Relay to this site's warm trainer when it has one running this app; else run here."""
    path = str(context.node_config.get(keys.TRAINER_SOCKET, ""))
    if path:
        try:
            reply = relay(path, msg, context, code_digest(APP_DIR))
        except OSError as err:  # no trainer listening (yet): this message runs cold
            log.warning("site trainer at %s unreachable (%s); handling the message here",
                        path, err)
            reply = None
        if reply is not None:
            return reply
    from client.app import app as full_app  # torch, transformers, the backbone: here

    return full_app(msg, context)


def code_digest(root: Path) -> str:
    """A digest of the code that handles messages (the packages in CODE_DIRS under `root`)."""
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*")):  # what a FAB carries of them:
            if (path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts
                    and not path.name.startswith("test_") and not path.stem.endswith("_test")):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def relay(path: str, msg: Message, context: Context, digest: str) -> Message | None:
    """The trainer's reply (Context updated in place), or None if it runs other code."""
    header = {"started": message_started(), "digest": digest, "app_dir": str(APP_DIR),
              "task": [TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id]}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        send(conn, header, [message_to_proto(msg).SerializeToString(),
                            context_to_proto(context).SerializeToString()])
        answer, blobs = receive(conn)
    if answer.get("mismatch"):
        log.warning("site trainer runs other code than this run's app (it restarts with the "
                    "app's); handling the message here")
        return None
    if "error" in answer:
        raise RuntimeError(f"site trainer: {answer['error']}")
    fresh = context_from_proto(ProtoContext.FromString(blobs[1]))
    context.state = fresh.state  # what the handlers keep across rounds (DP steps, residuals)
    return message_from_proto(ProtoMessage.FromString(blobs[0]))


def send(conn: socket.socket, header: dict, blobs: list[bytes]) -> None:
    """Write one frame: the JSON header, then each blob, each with its 8-byte length."""
    parts = [json.dumps(header).encode(), *blobs]
    conn.sendall(b"".join(struct.pack(">Q", len(p)) + p for p in parts))


def receive(conn: socket.socket, blobs: int = 2) -> tuple[dict, list[bytes]]:
    """Read one frame written by `send` (a header and `blobs` blobs; none after an error)."""
    header = json.loads(_exactly(conn, _length(conn)))
    if "error" in header or header.get("mismatch"):
        return header, []
    return header, [_exactly(conn, _length(conn)) for _ in range(blobs)]


def _length(conn: socket.socket) -> int:
    return struct.unpack(">Q", _exactly(conn, 8))[0]


def _exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("site trainer closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
