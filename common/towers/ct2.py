"""Read a CTranslate2 `model.bin` with NumPy and map its Whisper encoder to transformers names.

The binary layout is the one `ctranslate2/specs/model_spec.py` (`ModelSpec._serialize`) writes,
all little-endian: u32 binary version, string spec name, u32 revision, u32 variable count, then
per variable: string name, u8 rank, u32 dims, u8 dtype id, u32 byte count, raw bytes; then u32
alias count and (alias, target) string pairs. A string is a u16 length (with the trailing NUL),
the UTF-8 bytes and a NUL. ctranslate2 itself is not needed to read it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import WhisperConfig

BINARY_VERSION = 6  # the layout above (ctranslate2 4.x writes it)
BFLOAT16 = "bfloat16"
# Order of the DataType enum in CTranslate2 (model_spec._dtype_to_type_id).
DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, BFLOAT16)


class CT2FormatError(ValueError):
    """A file is not a CTranslate2 model this reader understands."""


class _Cursor:
    """Sequential little-endian reads over a bytes buffer."""

    def __init__(self, buf: bytes, source: str):
        self.buf, self.pos, self.source = buf, 0, source

    def unpack(self, fmt: str) -> tuple:
        try:
            out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise CT2FormatError(f"{self.source}: truncated at byte {self.pos}") from None
        self.pos += struct.calcsize("<" + fmt)
        return out

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.take(n)
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.source}: malformed string at byte {self.pos - n}")
        return raw[:-1].decode("utf-8")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise CT2FormatError(f"{self.source}: truncated at byte {self.pos}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def _array(raw: bytes, dtype_id: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    if dtype_id >= len(DTYPES):
        raise CT2FormatError(f"{name}: unknown dtype id {dtype_id}")
    dtype = DTYPES[dtype_id]
    if dtype == BFLOAT16:  # the high half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if arr.size != int(np.prod(shape)):
        raise CT2FormatError(f"{name}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def read_ct2(parts: Sequence[Path]) -> tuple[str, dict[str, np.ndarray]]:
    """Return the spec name and every variable (aliases resolved) of a model.bin, maybe in parts."""
    source = str(parts[0]) if len(parts) == 1 else " + ".join(str(p) for p in parts)
    cur = _Cursor(b"".join(Path(p).read_bytes() for p in parts), source)
    (version,) = cur.unpack("I")
    if version != BINARY_VERSION:
        raise CT2FormatError(f"{source}: binary version {version}, expected {BINARY_VERSION}")
    spec = cur.string()
    cur.unpack("I")  # spec revision
    (count,) = cur.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = cur.string()
        (rank,) = cur.unpack("B")
        shape = cur.unpack(f"{rank}I") if rank else ()
        dtype_id, nbytes = cur.unpack("BI")
        variables[name] = _array(cur.take(nbytes), dtype_id, tuple(shape), name)
    (n_alias,) = cur.unpack("I")
    for _ in range(n_alias):
        alias, target = cur.string(), cur.string()
        variables[alias] = variables[target]
    if cur.pos != len(cur.buf):
        raise CT2FormatError(f"{source}: {len(cur.buf) - cur.pos} trailing bytes")
    return spec, variables


def _num_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    found = {int(m.group(1)) for k in variables if (m := re.match(rf"{stack}/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise CT2FormatError(f"{stack}: layers {sorted(found)} are not 0..n-1")
    return len(found)


def whisper_config(variables: dict[str, np.ndarray]) -> WhisperConfig:
    """Build the transformers WhisperConfig whose dims match these CTranslate2 variables."""
    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    return WhisperConfig(
        num_mel_bins=int(n_mels), d_model=int(d_model),
        encoder_layers=_num_layers(variables, "encoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        decoder_layers=_num_layers(variables, "decoder"),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        vocab_size=int(variables["decoder/embeddings/weight"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
    )


def _f32(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind != "f":
        raise CT2FormatError(f"{name} is {arr.dtype}: quantized models are not supported; "
                             "convert with --quantization float16 or float32")
    return np.ascontiguousarray(arr, dtype=np.float32)


def whisper_encoder_state(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map every `encoder/*` variable to a transformers `WhisperEncoder` state dict (float32).

    Self-attention q/k/v are fused in CTranslate2 (rows: q, k, v); Whisper's k_proj has no
    bias, so the k third of the fused bias must be zero. Raises if any encoder variable is
    left unused.
    """
    unused = {k for k in variables if k.startswith("encoder/")}

    def take(name: str) -> np.ndarray:
        unused.discard(f"encoder/{name}")
        return _f32(variables[f"encoder/{name}"], f"encoder/{name}")

    def norm(ct2: str, hf: str) -> None:
        state[f"{hf}.weight"], state[f"{hf}.bias"] = take(f"{ct2}/gamma"), take(f"{ct2}/beta")

    def linear(ct2: str, hf: str) -> None:
        state[f"{hf}.weight"], state[f"{hf}.bias"] = take(f"{ct2}/weight"), take(f"{ct2}/bias")

    state: dict[str, np.ndarray] = {}
    linear("conv1", "conv1")
    linear("conv2", "conv2")
    state["embed_positions.weight"] = take("position_encodings/encodings")
    norm("layer_norm", "layer_norm")
    unused.discard("encoder/num_heads")  # in the config
    for i in range(_num_layers(variables, "encoder")):
        ct2, hf = f"layer_{i}", f"layers.{i}"
        qkv_w, qkv_b = take(f"{ct2}/self_attention/linear_0/weight"), take(
            f"{ct2}/self_attention/linear_0/bias")  # (3D, D), (3D,)
        q_w, k_w, v_w = np.split(qkv_w, 3)
        q_b, k_b, v_b = np.split(qkv_b, 3)
        if np.any(k_b != 0):
            raise CT2FormatError(f"encoder/{ct2}: the k_proj bias is not zero; not Whisper")
        state |= {f"{hf}.self_attn.q_proj.weight": q_w, f"{hf}.self_attn.q_proj.bias": q_b,
                  f"{hf}.self_attn.k_proj.weight": k_w,
                  f"{hf}.self_attn.v_proj.weight": v_w, f"{hf}.self_attn.v_proj.bias": v_b}
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    if unused:
        raise CT2FormatError(f"encoder variables without a transformers home: {sorted(unused)}")
    return {k: np.ascontiguousarray(v) for k, v in state.items()}
