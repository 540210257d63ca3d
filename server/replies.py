"""Train and evaluate replies as the server reads them: decoded once, screened, summarised.

`reply_problem` says why a train reply cannot be aggregated (a client error, missing arrays or
metrics, bad modality counts, LoRA factors that do not pair, then `rejection_reason`'s layout,
dtype, NaN/Inf and num-examples checks); `decode_array` reads a reply's bytes as a read-only
NumPy view when they are exactly what np.save writes; `site_results` gathers the per-site
evaluation figures that metrics.jsonl records; `in_content_order` orders replies by what they
hold, not by when they came, so that a round's float sums are the same bits in every run.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common import keys
from common.adapter import rejection_reason
from common.lora_math import pair_rank_problem


def decode_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: decode_array(v) for k, v in record.items()}


class DecodedArray(Array):
    """A reply's Array whose NumPy value screening has decoded: Flower's strategies get it
    without decoding the bytes again (a copy, so they may change it in place)."""

    @classmethod
    def of(cls, array: Array, value: np.ndarray) -> DecodedArray:
        out = cls(array.dtype, tuple(array.shape), array.stype, array.data)
        out.__dict__["_fedmm_value"] = value
        return out

    def numpy(self) -> np.ndarray:
        return np.array(self.__dict__["_fedmm_value"])


_LAYOUTS: dict[tuple[str, tuple[int, ...]], tuple[bytes, np.dtype, int, int]] = {}


def decode_array(value: Array) -> np.ndarray:
    """An Array as NumPy: a read-only view when its bytes are exactly what np.save writes for
    its dtype and shape (np.load's header parsing costs more than the mean of 100 replies),
    else Flower's own decoding."""
    data, shape = value.data, tuple(value.shape)
    layout = _LAYOUTS.get((value.dtype, shape))
    if layout is None:
        try:
            dtype = np.dtype(value.dtype)
        except TypeError:
            return value.numpy()
        if len(_LAYOUTS) > 4096:  # bounded, whatever shapes replies claim
            _LAYOUTS.clear()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": dtype.str, "fortran_order": False,
                                                      "shape": shape})
        count = math.prod(shape)
        layout = header.getvalue(), dtype, count, len(header.getvalue()) + count * dtype.itemsize
        _LAYOUTS[(value.dtype, shape)] = layout
    header, dtype, count, size = layout
    if value.stype != "numpy.ndarray" or len(data) != size or not data.startswith(header):
        return value.numpy()
    return np.frombuffer(data, dtype, count, len(header)).reshape(shape)


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


SITE_FIELDS = {keys.EVAL_ACCURACY: "accuracy", keys.EVAL_MACRO_F1: "macro_f1",
               keys.EVAL_LOSS: "loss", keys.NUM_EXAMPLES: "num_examples",
               keys.PERSONAL_ACCURACY: "personal_accuracy",
               keys.PERSONAL_MACRO_F1: "personal_macro_f1"}  # evaluate reply -> metrics.jsonl


def in_content_order(replies: Iterable[Message]) -> list[Message]:
    """The replies sorted by a digest of their arrays, example count and site name (error
    replies first, in arrival order: they are only counted and named).

    Flower hands replies over in arrival order and sums them in list order; float addition is
    not associative, so arrival order would reach the global adapter's last bits and, through
    the next rounds' training, the accuracies. Timings are left out of the digest: they differ
    between runs, the content does not.
    """
    return sorted(replies, key=_content_digest)


def _content_digest(msg: Message) -> bytes:
    if msg.has_error():
        return b""
    h = hashlib.blake2b(digest_size=16)
    for key, value in msg.content.array_records.get(keys.ARRAYS, {}).items():
        h.update(key.encode())
        h.update(value.data)
    metrics = msg.content.metric_records.get(keys.METRICS, {})
    site = msg.content.config_records.get(keys.SITE, {})
    h.update(f"{metrics.get(keys.NUM_EXAMPLES)} {site.get(keys.SITE_NAME)}".encode())
    return h.digest()


def site_results(replies: list[Message]) -> dict[str, dict]:
    """Each replying site's evaluation figures, by the name its reply gives."""
    out = {}
    for msg in replies:
        if msg.has_error() or keys.SITE not in msg.content.config_records:
            continue
        metrics = msg.content[keys.METRICS]
        name = str(msg.content[keys.SITE][keys.SITE_NAME])
        out[name] = {f: int(metrics[k]) if f == "num_examples" else float(metrics[k])
                     for k, f in SITE_FIELDS.items() if k in metrics}
    return dict(sorted(out.items()))


def client_error(reason: str) -> str:
    """The gist of a Flower error reply, in one line: the ClientApp exception and its message.

    Flower sends `<class 'T'>:<'message'>`; under Ray the message is Ray's whole traceback,
    ending in Flower's `... Message: <the ClientApp's message>`.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)  # Ray colours its traceback
    match = re.fullmatch(r"<class '([^']*)'>:<'(.*)'>", text, re.DOTALL)
    if not match:
        return " ".join(text.split())
    kind, message = match[1].rsplit(".", 1)[-1], match[2]
    if "Message: " in message:  # Ray's traceback around Flower's ClientAppException
        return " ".join(message.rsplit("Message: ", 1)[1].split())
    return f"{kind}: {' '.join(message.split())}"
def uploaded_bytes(msg: Message) -> int:
    """Bytes of the arrays a reply carried (as sent: compressed when compression is on)."""
    if msg.has_error() or keys.ARRAYS not in msg.content.array_records:
        return 0
    return msg.content[keys.ARRAYS].count_bytes()


def reply_problem(msg: Message, expected: dict[str, tuple[int, ...]],
                   rank_flexible: bool = False,
                   arrays: Callable[[Message], dict[str, np.ndarray]] | None = None,
                   check_finite: bool = True) -> str | None:
    """Why a train reply cannot be aggregated, or None (LoRA ranks may vary if flexible;
    NaN/Inf left to the caller when `check_finite` is off)."""
    if msg.has_error():
        return f"client error: {client_error(msg.error.reason)}"
    content = msg.content
    if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
        return "reply lacks the adapter arrays or the metrics"
    metrics = content[keys.METRICS]
    try:
        update = arrays(msg) if arrays else decode_arrays(content[keys.ARRAYS])
        num_examples = float(metrics.get(keys.NUM_EXAMPLES, 0))
        with_modality = [float(metrics.get(k, 0)) for k in keys.NUM_MODALITY_EXAMPLES.values()]
    except (ValueError, TypeError) as err:
        return f"reply cannot be decoded: {err}"
    if not all(0 <= c <= num_examples for c in with_modality):  # NaN fails too
        return (f"modality counts {with_modality} outside [0, num-examples={num_examples:g}]")
    if rank_flexible:
        problem = pair_rank_problem(update, expected)
        if problem:
            return problem
        expected = {k: (np.shape(update[k]) if ".lora_" in k and k in update else s)
                    for k, s in expected.items()}
    return rejection_reason(expected, update, num_examples, check_finite)
