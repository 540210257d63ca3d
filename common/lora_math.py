"""Server-side aggregation of LoRA adapter states, as pure functions over NumPy arrays.

An adapter state is PEFT's `get_peft_model_state_dict` as float32 NumPy arrays. A LoRA layer is
the key pair `<prefix>.lora_A.weight` (r, in) and `<prefix>.lora_B.weight` (out, r), with
ΔW = s · B @ A and s = lora_alpha / r; every other key (heads, `modules_to_save`, DoRA magnitudes,
`lora_embedding_*`) is an ordinary tensor, always averaged by weight. Client weights p_k are
num_examples, normalised here to sum 1.

Modes, per round and per LoRA layer with o = out, i = in, rank r; K clients; N other trainable
numbers; D = all numbers in the state. Sizes are in numbers, 4 bytes each (float32). "Linear"
means the aggregate is a weighted sum of what clients upload, so it composes with secure
aggregation and central DP noise.

  mode           upload/client   download/client    server compute            linear  exact
  naive          r(i+o) + N      r(i+o) + N         O(K·r(i+o))               yes     no
  ffa            r·o + N         r·o + N            O(K·r·o)                  yes     yes
  exact          r(i+o) + N      r(i+o) + o·i + N   O(K·r·o·i)                no      yes
  heterogeneous  r_k(i+o) + N    r(i+o) + N         O(K·r_k·o·i + o·i·min)    no      rank-r best
  norm_bounded   D               D                  O(K·D) + median           (*)     no

- naive: mean(B) mean(A) != mean(B A), so the averaged adapter is not the average of client
  updates; cheap baseline.
- ffa: A is frozen from a shared seed and identical everywhere, so mean(B_k) A = mean(B_k A):
  exact, linear, and clients upload only B (o/(i+o) of the LoRA bytes). Costs expressiveness.
- exact: the adapter gets mean(A), mean(B); the residual R = Σ p_k s B_k A_k − s mean(B) mean(A)
  is dense (out, in) and must be folded into every site's frozen base weight (in the nn.Linear
  (out, in) orientation; transpose for PEFT `fan_in_fan_out` layers), hence the dense download.
- heterogeneous: clients may train different ranks r_k; the server forms the dense
  ΔW = Σ p_k s_k B_k A_k and re-factors it by truncated SVD at the target rank. Becomes linear
  (the SVD is then post-processing) only if clients upload dense ΔW_k, at out·in numbers each.
- norm_bounded: each client's whole update is clipped to a norm bound before the weighted mean,
  bounding any one client's influence. (*) Linear with a fixed bound (clients may clip locally:
  DP-FedAvg); bound=None uses the round's median norm, which needs every norm in the clear.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"

State = dict[str, np.ndarray]


def _weights(weights: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """Return weights as float64 summing to 1, or raise if they cannot be."""
    p = np.asarray(weights, dtype=np.float64)
    if p.ndim != 1 or p.shape[0] != n:
        raise ValueError(f"need one weight per client: got shape {p.shape} for {n} clients")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {p.tolist()}")
    return p / p.sum()


def _check_keys(states: Sequence[State], ignore: str | None = None) -> list[str]:
    """Return the sorted key set shared by every state (minus keys ending in `ignore`)."""
    if len(states) == 0:
        raise ValueError("no client states to aggregate")
    key_sets = [{k for k in s if ignore is None or not k.endswith(ignore)} for s in states]
    for i, keys in enumerate(key_sets[1:], start=1):
        if keys != key_sets[0]:
            raise ValueError(f"client {i} keys differ from client 0: {sorted(keys ^ key_sets[0])[:3]}")
    return sorted(key_sets[0])


def _check_shapes(states: Sequence[State], keys: list[str]) -> None:
    """Raise unless every state has the same shape under each of `keys`."""
    for k in keys:
        for i, s in enumerate(states[1:], start=1):
            if s[k].shape != states[0][k].shape:
                raise ValueError(f"client {i} {k}: shape {s[k].shape} != client 0 {states[0][k].shape}")


def lora_pairs(state: State) -> dict[str, tuple[str, str]]:
    """Map each LoRA layer prefix to its (A key, B key); raise on an unpaired factor."""
    a = {k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)}
    b = {k[: -len(B_SUFFIX)] for k in state if k.endswith(B_SUFFIX)}
    if a != b:
        orphans = [p + A_SUFFIX for p in sorted(a - b)] + [p + B_SUFFIX for p in sorted(b - a)]
        raise ValueError(f"LoRA factor without its partner: {orphans[:3]}")
    return {p: (p + A_SUFFIX, p + B_SUFFIX) for p in sorted(a)}


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return Σ p_k x_k (weights normalised to sum 1), accumulated in float64, as float32."""
    if len(arrays) == 0:
        raise ValueError("weighted_mean of no arrays")
    p = _weights(weights, len(arrays))
    shape = np.shape(arrays[0])
    acc, term = np.zeros(shape, dtype=np.float64), np.empty(shape, dtype=np.float64)
    for i, (x, pk) in enumerate(zip(arrays, p)):
        if np.shape(x) != shape:
            raise ValueError(f"array {i} has shape {np.shape(x)}, array 0 has {shape}")
        term[...] = x  # (one float64 buffer for every site's term)
        term *= pk
        acc += term
    return acc.astype(np.float32)


def tower_modality(key: str) -> str | None:
    """The modality whose rows train tensor `key` (None: every row does, e.g. the fusion head).

    Tower tensors live under `towers.<modality>.` (common/model.py).
    """
    parts = key.split(".")
    return parts[parts.index("towers") + 1] if "towers" in parts[:-1] else None


def reweight_towers(mean: State, states: Sequence[State], counts: dict[str, np.ndarray]
                    ) -> State:
    """Average each tower's tensors over the rows that hold its modality.

    `mean` is the example-weighted mean of `states`; `counts[m]` (K,) holds each site's rows
    with modality m. A site without images trained its vision tower on nothing, so it must not
    pull that tower back towards the old global value. Tensors of a modality that is absent
    from `counts` or that no site holds keep their value in `mean`.
    """
    out = dict(mean)
    for key in mean:
        c = counts.get(tower_modality(key) or "")
        if c is not None and c.sum() > 0:
            out[key] = weighted_mean([s[key] for s in states], c)
    return out


def _is_pair(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether A (r, in, *kernel) and B (out, r, 1, ...) are one LoRA layer's factors.

    Linear layers: A (r, in), B (out, r). Conv layers (PEFT): A (r, in, kh, kw), B (out, r, 1, 1);
    either way ΔW = s · B(out, r) @ A(r, in·kh·kw), reshaped to the base weight.
    """
    return (len(a) >= 2 and len(b) >= 2 and a[0] == b[1] and a[0] >= 1
            and all(d == 1 for d in b[2:]))


def delta_w(state: State, prefix: str, scaling: float) -> np.ndarray:
    """Return the layer's update s · B @ A, (out, in) (conv: in·kh·kw), in float64."""
    a_key, b_key = prefix + A_SUFFIX, prefix + B_SUFFIX
    if a_key not in state or b_key not in state:
        raise ValueError(f"no LoRA pair for layer {prefix!r}")
    a = np.asarray(state[a_key], dtype=np.float64)  # (r, in[, kh, kw])
    b = np.asarray(state[b_key], dtype=np.float64)  # (out, r[, 1, 1])
    if not _is_pair(a.shape, b.shape):
        raise ValueError(f"{prefix}: B {b.shape} @ A {a.shape} is not a rank-r product")
    return float(scaling) * (b.reshape(b.shape[:2]) @ a.reshape(a.shape[0], -1))


def refactor_like(delta: np.ndarray, rank: int, scaling: float, a_shape: tuple[int, ...],
                  b_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """`refactor`, reshaped to factors of a layer whose A/B have (any rank) `a_shape`/`b_shape`."""
    b, a = refactor(delta, rank, scaling)
    return b.reshape(b_shape[0], rank, *b_shape[2:]), a.reshape(rank, *a_shape[1:])


def aggregate_naive(states: Sequence[State], weights: Sequence[float]) -> State:
    """Average every tensor, A and B separately (FedIT; not the mean of client updates)."""
    keys = _check_keys(states)
    _check_shapes(states, keys)
    return {k: weighted_mean([s[k] for s in states], weights) for k in keys}


def aggregate_exact(
    states: Sequence[State], weights: Sequence[float], scaling: float,
    mean: State | None = None
) -> tuple[State, dict[str, np.ndarray]]:
    """Average factors and return per-layer residuals R so base + R + s B̄Ā = base + Σ p_k ΔW_k
    (`mean`: the states' weighted mean, where the caller has it already)."""
    p = _weights(weights, len(states))
    adapter = aggregate_naive(states, p) if mean is None else mean
    residuals: dict[str, np.ndarray] = {}
    for prefix, (a_key, b_key) in lora_pairs(adapter).items():
        target = mixed_delta_w(states, p, prefix, scaling)  # (out, in)
        residuals[prefix] = (target - delta_w(adapter, prefix, scaling)).astype(np.float32)
    return adapter, residuals


def mixed_delta_w(states: Sequence[State], p: np.ndarray, prefix: str, scaling: float
                  ) -> np.ndarray:
    """Σ_k p_k s B_k A_k of one layer as one float64 matmul, [p_k B_k]_k @ [A_k]_k."""
    for s in states:
        if not _is_pair(np.shape(s[prefix + A_SUFFIX]), np.shape(s[prefix + B_SUFFIX])):
            raise ValueError(f"{prefix}: B {np.shape(s[prefix + B_SUFFIX])} @ A "
                             f"{np.shape(s[prefix + A_SUFFIX])} is not a rank-r product")
    a = np.concatenate([np.asarray(s[prefix + A_SUFFIX], np.float64).reshape(
        np.shape(s[prefix + A_SUFFIX])[0], -1) for s in states])  # (K·r, in)
    b = np.concatenate([pk * np.asarray(s[prefix + B_SUFFIX], np.float64).reshape(
        np.shape(s[prefix + B_SUFFIX])[:2]) for s, pk in zip(states, p)], axis=1)  # (out, K·r)
    return float(scaling) * (b @ a)


def refactor(delta: np.ndarray, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """Split `delta` into float32 (B, A) with s · B @ A its best rank-`rank` approximation."""
    d = np.asarray(delta, dtype=np.float64)  # (out, in)
    if d.ndim != 2:
        raise ValueError(f"delta must be a 2-D (out, in) matrix, got shape {d.shape}")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if not np.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"scaling must be positive and finite, got {scaling}")
    u, sig, vt = np.linalg.svd(d, full_matrices=False)  # (out, m), (m,), (m, in)
    k = min(int(rank), sig.shape[0])
    root = np.sqrt(sig[:k] / scaling)  # (k,)
    b = np.zeros((d.shape[0], int(rank)))  # (out, rank), zero-padded past k
    a = np.zeros((int(rank), d.shape[1]))  # (rank, in)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    return b.astype(np.float32), a.astype(np.float32)


def aggregate_heterogeneous(
    states: Sequence[State],
    weights: Sequence[float],
    scalings: Sequence[float],
    target_rank: int,
    target_scaling: float,
) -> tuple[State, dict[str, float]]:
    """Sum clients' ΔW across ranks, re-factor at `target_rank`; return relative truncation errors."""
    p = _weights(weights, len(states))
    if len(scalings) != len(states):
        raise ValueError(f"need one scaling per client: got {len(scalings)} for {len(states)} clients")
    keys = _check_keys(states)
    pairs = lora_pairs(states[0])
    lora_keys = {k for pair in pairs.values() for k in pair}
    _check_shapes(states, [k for k in keys if k not in lora_keys])
    out = {k: weighted_mean([s[k] for s in states], p) for k in keys if k not in lora_keys}
    errors: dict[str, float] = {}
    for prefix, (a_key, b_key) in pairs.items():
        deltas = [delta_w(s, prefix, sk) for s, sk in zip(states, scalings)]
        for i, d in enumerate(deltas[1:], start=1):
            if d.shape != deltas[0].shape:
                raise ValueError(f"client {i} {prefix}: ΔW {d.shape} != client 0 {deltas[0].shape}")
        target = sum(pk * d for pk, d in zip(p, deltas))  # (out, in)
        b, a = refactor(target, target_rank, target_scaling)  # (out, r), (r, in)
        out[a_key] = a.reshape(target_rank, *states[0][a_key].shape[1:])
        out[b_key] = b.reshape(b.shape[0], target_rank, *states[0][b_key].shape[2:])
        norm = np.linalg.norm(target)
        approx = target_scaling * (b.astype(np.float64) @ a.astype(np.float64))
        errors[prefix] = float(np.linalg.norm(target - approx) / norm) if norm > 0 else 0.0
    return {k: out[k] for k in sorted(out)}, errors


def _update(state: State, reference: State) -> np.ndarray:
    """Return state − reference over all reference keys as one flat float64 vector."""
    if set(state) != set(reference):
        raise ValueError(f"state keys differ from reference: {sorted(set(state) ^ set(reference))[:3]}")
    parts = []
    for k in sorted(reference):
        if np.shape(state[k]) != np.shape(reference[k]):
            raise ValueError(f"{k}: shape {np.shape(state[k])} != reference {np.shape(reference[k])}")
        parts.append((np.asarray(state[k], np.float64) - np.asarray(reference[k], np.float64)).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def update_norm(state: State, reference: State) -> float:
    """Return the L2 norm of state − reference over all keys together."""
    return float(np.linalg.norm(_update(state, reference)))


def norm_bounded_mean(
    states: Sequence[State], weights: Sequence[float], reference: State, bound: float | None = None
) -> tuple[State, float]:
    """Clip each update to norm ≤ bound (default: median norm); return reference + weighted mean."""
    if len(states) == 0:
        raise ValueError("no client states to aggregate")
    p = _weights(weights, len(states))
    updates = [_update(s, reference) for s in states]  # K × (D,)
    norms = np.array([np.linalg.norm(u) for u in updates])
    used = float(np.median(norms)) if bound is None else float(bound)
    if not np.isfinite(used) or used < 0:
        raise ValueError(f"bound must be finite and non-negative, got {bound}")
    factors = np.minimum(1.0, used / np.maximum(norms, np.finfo(np.float64).tiny))
    mean = sum(pk * ck * u for pk, ck, u in zip(p, factors, updates))  # (D,)
    out, offset = {}, 0
    for k in sorted(reference):
        ref = np.asarray(reference[k], np.float64)
        out[k] = (ref + mean[offset : offset + ref.size].reshape(ref.shape)).astype(np.float32)
        offset += ref.size
    return out, used


def fit_rank(state: State, rank: int, alpha: float) -> State:
    """Re-factor every LoRA pair of `state` to `rank` (scaling alpha/rank), keeping s·B·A."""
    out = dict(state)
    for prefix, (a_key, b_key) in lora_pairs(state).items():
        r_in = state[a_key].shape[0]
        if r_in == rank:
            continue
        out[b_key], out[a_key] = refactor_like(delta_w(state, prefix, alpha / r_in), rank,
                                               alpha / rank, state[a_key].shape,
                                               state[b_key].shape)
    return out


def pair_rank_problem(state: State, reference: dict[str, tuple[int, ...]]) -> str | None:
    """Why the LoRA pairs of `state` do not fit `reference` up to their rank, or None."""
    for a_key, b_key in lora_pairs(reference).values():
        if a_key not in state or b_key not in state:
            continue  # missing keys are reported by the caller's key check
        a, b = np.shape(state[a_key]), np.shape(state[b_key])
        if not _is_pair(a, b) or a[1:] != tuple(reference[a_key][1:]) or \
                b[0] != reference[b_key][0] or b[2:] != tuple(reference[b_key][2:]):
            return f"{a_key}: LoRA factors {a} / {b} do not form a pair for this layer"
    return None
