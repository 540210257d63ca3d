"""LoRA aggregation modes, each checked against an independent NumPy computation in this file."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.lora_math import (
    aggregate_exact,
    aggregate_heterogeneous,
    aggregate_naive,
    delta_w,
    fit_rank,
    lora_pairs,
    norm_bounded_mean,
    pair_rank_problem,
    refactor,
    update_norm,
    weighted_mean,
)

ENC = "base_model.model.towers.text.encoder.encoder.layer.0.attention.self."
QUERY, VALUE = ENC + "query", ENC + "value"
HEAD = "base_model.model.head.1.weight"
A, B = ".lora_A.weight", ".lora_B.weight"
NUM_EXAMPLES = [30, 10, 25, 5, 50]


def _p(n) -> np.ndarray:
    return np.asarray(n, dtype=np.float64) / np.sum(n)


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def _local_train(a0, b0, w_base, x, y, s, steps=10, lr=0.01):
    """Plain gradient descent on ‖(W_base + s B A) X − Y‖² / n w.r.t. A and B; return (A, B, losses)."""
    a, b = a0.astype(np.float64), b0.astype(np.float64)  # (r, in), (out, r)
    losses = []
    for _ in range(steps):
        err = (w_base + s * b @ a) @ x - y  # (out, n)
        losses.append(float(np.sum(err**2) / x.shape[1]))
        g = 2.0 * err @ x.T / x.shape[1]  # (out, in) gradient w.r.t. ΔW
        b, a = b - lr * s * g @ a.T, a - lr * s * b.T @ g
    return a.astype(np.float32), b.astype(np.float32), losses


def _trained_clients(s: float = 2.0, r: int = 4):
    """Five clients fine-tuning two LoRA layers from a shared A0 and zero B0 on their own targets."""
    rng = np.random.default_rng(0)
    shapes = {QUERY: (10, 12), VALUE: (6, 8)}  # (out, in)
    states = [{HEAD: rng.normal(size=(3, 10)).astype(np.float32)} for _ in NUM_EXAMPLES]
    for prefix, (out, inp) in shapes.items():
        w_base = rng.normal(size=(out, inp))
        a0 = rng.normal(scale=1 / np.sqrt(inp), size=(r, inp))  # (r, in) shared init
        b0 = np.zeros((out, r))  # (out, r)
        for state in states:
            x = rng.normal(size=(inp, 32))  # (in, n)
            y = (w_base + rng.normal(size=(out, inp))) @ x  # this client's own target
            a, b, losses = _local_train(a0, b0, w_base, x, y, s)
            assert losses[-1] < 0.9 * losses[0]  # it really trained
            state[prefix + A], state[prefix + B] = a, b
    return states, shapes


def test_exact_residual_recovers_mean_update_naive_does_not():
    s = 2.0
    states, shapes = _trained_clients(s)
    p = _p(NUM_EXAMPLES)
    adapter, residuals = aggregate_exact(states, NUM_EXAMPLES, s)
    naive = aggregate_naive(states, NUM_EXAMPLES)
    assert set(residuals) == set(shapes)
    for prefix, shape in shapes.items():
        target = np.einsum(  # Σ p_k s B_k A_k, (out, in)
            "k,kor,kri->oi", p, np.stack([st_[prefix + B] for st_ in states]).astype(np.float64),
            np.stack([st_[prefix + A] for st_ in states]).astype(np.float64)) * s
        b_bar = np.average(np.stack([st_[prefix + B] for st_ in states]), axis=0, weights=p)
        a_bar = np.average(np.stack([st_[prefix + A] for st_ in states]), axis=0, weights=p)
        np.testing.assert_allclose(adapter[prefix + B], b_bar, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(adapter[prefix + A], a_bar, rtol=1e-6, atol=1e-7)
        assert residuals[prefix].shape == shape
        got = s * adapter[prefix + B].astype(np.float64) @ adapter[prefix + A] + residuals[prefix]
        exact_err = _rel(got, target)
        naive_err = _rel(s * naive[prefix + B].astype(np.float64) @ naive[prefix + A], target)
        print(f"{prefix.rsplit('.', 1)[1]}: exact rel err {exact_err:.2e}, naive {naive_err:.2e}")
        assert exact_err < 1e-5
        assert naive_err > 1e-3
    np.testing.assert_allclose(adapter[HEAD], np.average([x[HEAD] for x in states], axis=0, weights=p),
                               rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), r=st.integers(1, 3), out=st.integers(1, 5), inp=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_exact_identity_holds_for_any_shapes(k, r, out, inp, seed):
    rng = np.random.default_rng(seed)
    states = [{"l" + A: rng.normal(size=(r, inp)).astype(np.float32),
               "l" + B: rng.normal(size=(out, r)).astype(np.float32)} for _ in range(k)]
    n = rng.integers(1, 100, size=k)
    adapter, res = aggregate_exact(states, n, 0.5)
    target = sum(pk * 0.5 * x["l" + B].astype(np.float64) @ x["l" + A] for pk, x in zip(_p(n), states))
    got = 0.5 * adapter["l" + B].astype(np.float64) @ adapter["l" + A] + res["l"]
    np.testing.assert_allclose(got, target, atol=1e-5 * max(1.0, np.abs(target).max()))


def _hetero_clients(ranks=(2, 4, 8), alpha=8.0, out=10, inp=12):
    rng = np.random.default_rng(2)
    states = [{QUERY + A: rng.normal(size=(r, inp)).astype(np.float32),
               QUERY + B: rng.normal(size=(out, r)).astype(np.float32),
               HEAD: rng.normal(size=(3, 10)).astype(np.float32)} for r in ranks]
    return states, [alpha / r for r in ranks]


def test_heterogeneous_ranks_refactor_to_best_low_rank():
    states, scalings = _hetero_clients()
    n = [10, 30, 60]
    p = _p(n)
    ref = sum(pk * sk * x[QUERY + B].astype(np.float64) @ x[QUERY + A]
              for pk, sk, x in zip(p, scalings, states))  # (10, 12), rank 10
    full, err_full = aggregate_heterogeneous(states, n, scalings, target_rank=10, target_scaling=0.8)
    assert _rel(0.8 * full[QUERY + B].astype(np.float64) @ full[QUERY + A], ref) < 1e-5
    assert err_full[QUERY] < 1e-5
    np.testing.assert_allclose(full[HEAD], np.average([x[HEAD] for x in states], axis=0, weights=p),
                               rtol=1e-6)

    low, err_low = aggregate_heterogeneous(states, n, scalings, target_rank=2, target_scaling=4.0)
    assert low[QUERY + B].shape == (10, 2) and low[QUERY + A].shape == (2, 12)
    u, sig, vt = np.linalg.svd(ref)
    tail = np.sqrt(np.sum(sig[2:] ** 2)) / np.linalg.norm(ref)
    assert err_low[QUERY] == pytest.approx(tail, abs=1e-5)
    best2 = (u[:, :2] * sig[:2]) @ vt[:2]
    assert _rel(4.0 * low[QUERY + B].astype(np.float64) @ low[QUERY + A], best2) < 1e-5

    padded, err_pad = aggregate_heterogeneous(states, n, scalings, target_rank=16, target_scaling=0.5)
    b, a = padded[QUERY + B], padded[QUERY + A]
    assert b.shape == (10, 16) and a.shape == (16, 12)
    assert not b[:, 10:].any() and not a[10:].any()
    assert err_pad[QUERY] < 1e-5 and _rel(0.5 * b.astype(np.float64) @ a, ref) < 1e-5


def test_refactor_rejects_bad_input_and_zero_delta_has_no_error():
    with pytest.raises(ValueError, match="rank"):
        refactor(np.ones((3, 3)), 0, 1.0)
    with pytest.raises(ValueError, match="scaling"):
        refactor(np.ones((3, 3)), 2, 0.0)
    states = [{"l" + A: np.zeros((2, 3), np.float32), "l" + B: np.zeros((4, 2), np.float32)}]
    agg, err = aggregate_heterogeneous(states, [1], [1.0], 2, 1.0)
    assert err == {"l": 0.0} and not agg["l" + B].any()


def _flat(state, keys):
    return np.concatenate([np.asarray(state[k], np.float64).ravel() for k in keys])


def _clip_reference(states, n, reference, bound=None):
    """NumPy norm clipping: flat updates, clip to bound (median if None), reference + weighted mean."""
    keys = sorted(reference)
    ups = np.stack([_flat(x, keys) - _flat(reference, keys) for x in states])  # (K, D)
    norms = np.linalg.norm(ups, axis=1)
    c = np.median(norms) if bound is None else bound
    clipped = ups * np.minimum(1.0, c / norms)[:, None]
    return _flat(reference, keys) + _p(n) @ clipped, c, keys


def test_norm_bounded_mean_limits_a_scaled_update():
    rng = np.random.default_rng(3)
    reference = {QUERY + A: rng.normal(size=(4, 12)), HEAD: rng.normal(size=(3, 10))}
    n = [20, 20, 20, 20, 20, 20]
    honest = [{k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in reference.items()}
              for _ in n]
    attacked = honest[:-1] + [{k: reference[k] + 50 * (honest[-1][k] - reference[k]) for k in reference}]
    keys = sorted(reference)
    honest_mean = _p(n) @ np.stack([_flat(x, keys) for x in honest])
    plain_mean = _p(n) @ np.stack([_flat(x, keys) for x in attacked])

    got, used = norm_bounded_mean(attacked, n, reference)
    want, median, _ = _clip_reference(attacked, n, reference)
    assert used == pytest.approx(median)
    np.testing.assert_allclose(_flat(got, keys), want, rtol=1e-6, atol=1e-6)
    dist = np.linalg.norm(_flat(got, keys) - honest_mean)
    assert dist < 0.05 * np.linalg.norm(plain_mean - honest_mean)

    got, used = norm_bounded_mean(attacked, n, reference, bound=0.05)
    want, _, _ = _clip_reference(attacked, n, reference, bound=0.05)
    assert used == 0.05
    np.testing.assert_allclose(_flat(got, keys), want, rtol=1e-6, atol=1e-6)
    assert update_norm(got, reference) <= 0.05 + 1e-6
    with pytest.raises(ValueError, match="bound"):
        norm_bounded_mean(attacked, n, reference, bound=-1.0)


def test_update_norm_is_the_flat_l2_distance():
    rng = np.random.default_rng(4)
    ref = {"x": rng.normal(size=(3, 4)), "y": rng.normal(size=5)}
    state = {k: v + rng.normal(size=v.shape) for k, v in ref.items()}
    flat = np.concatenate([(state[k] - ref[k]).ravel() for k in ref])
    assert update_norm(state, ref) == pytest.approx(np.sqrt(np.sum(flat**2)))
    with pytest.raises(ValueError, match="keys differ"):
        update_norm({"x": state["x"]}, ref)


def test_weighted_mean_matches_np_average_and_validates():
    rng = np.random.default_rng(5)
    arrays = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)]
    w = [3, 1, 0, 6]
    got = weighted_mean(arrays, w)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.average(np.stack(arrays), axis=0, weights=w), rtol=1e-6)
    with pytest.raises(ValueError, match="one weight per client"):
        weighted_mean(arrays, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean(arrays, [1, -1, 1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([arrays[0], arrays[1][:2]], [1, 1])


def test_lora_pairs_maps_prefixes_and_rejects_orphans():
    state = {QUERY + A: np.zeros((2, 3)), QUERY + B: np.zeros((4, 2)), HEAD: np.zeros(3)}
    assert lora_pairs(state) == {QUERY: (QUERY + A, QUERY + B)}
    with pytest.raises(ValueError, match="value.lora_A.weight"):
        lora_pairs({**state, VALUE + A: np.zeros((2, 3))})
    with pytest.raises(ValueError, match="value.lora_B.weight"):
        lora_pairs({**state, VALUE + B: np.zeros((4, 2))})
    with pytest.raises(ValueError, match="keys differ"):
        aggregate_naive([state, {QUERY + A: state[QUERY + A]}], [1, 1])
    assert delta_w(state, QUERY, 2.0).shape == (4, 3)


CONV = "base_model.model.towers.image.encoder.blocks.5.0.conv_pw"


def _conv_state(rng, rank: int, out: int = 10, inp: int = 6) -> dict[str, np.ndarray]:
    """A PEFT Conv2d LoRA pair (1x1 kernel): A (r, in, 1, 1), B (out, r, 1, 1)."""
    return {CONV + A: rng.normal(size=(rank, inp, 1, 1)).astype(np.float32),
            CONV + B: rng.normal(size=(out, rank, 1, 1)).astype(np.float32)}


def test_conv_lora_factors_pair_refactor_and_aggregate_like_linear_ones():
    rng = np.random.default_rng(7)
    states = [_conv_state(rng, r) for r in (2, 4)]
    # ΔW = s · B A as the conv weight (out, in, 1, 1): einsum over the rank, flattened kernel.
    ref = 0.5 * np.einsum("oryx,riyx->oi", states[1][CONV + B].astype(np.float64),
                          states[1][CONV + A].astype(np.float64))
    np.testing.assert_allclose(delta_w(states[1], CONV, 0.5), ref, rtol=1e-12)
    reference = {k: v.shape for k, v in states[1].items()}
    assert pair_rank_problem(states[0], reference) is None  # another rank, same layer: fine
    wrong_kernel = {CONV + A: np.zeros((2, 6, 3, 3), np.float32), CONV + B: states[0][CONV + B]}
    assert "do not form a pair" in pair_rank_problem(wrong_kernel, reference)
    merged, _ = aggregate_heterogeneous(states, [1.0, 3.0], [8 / 2, 8 / 4], 4, 8 / 4)
    assert merged[CONV + A].shape == (4, 6, 1, 1) and merged[CONV + B].shape == (10, 4, 1, 1)
    dense = 0.25 * delta_w(states[0], CONV, 4.0) + 0.75 * delta_w(states[1], CONV, 2.0)
    u, sig, vt = np.linalg.svd(dense)
    np.testing.assert_allclose(delta_w(merged, CONV, 2.0), (u[:, :4] * sig[:4]) @ vt[:4],
                               atol=1e-4)
    refit = fit_rank(states[0], 3, 8.0)
    assert refit[CONV + A].shape == (3, 6, 1, 1)
    np.testing.assert_allclose(delta_w(refit, CONV, 8 / 3), delta_w(states[0], CONV, 4.0),
                               atol=1e-4)  # rank 2 fits in rank 3 exactly
