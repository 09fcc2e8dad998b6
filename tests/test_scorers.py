"""Scorers on hand-made inputs with known answers; kernels against their numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from amslocal.layers import LayerInfo
from amslocal.scorers import (
    H2O,
    RKV,
    SCORERS,
    TOVA,
    ExpectedAttention,
    KeyDiff,
    ScoreInput,
    SnapKV,
    StreamingLLM,
    TriAttention,
    calibration_stats,
    kernels,
    load_calibration,
    make_scorer,
    save_calibration,
)
from amslocal.scorers.rope import rope_mean_matrix, rope_rotate
from amslocal.scorers.triattention import check_calibration, merge_calibration


def layer(n_head=2, n_head_kv=1, d=8, n_rot=None, rope_type=0, base=10000.0, scale=1.0) -> LayerInfo:
    return LayerInfo(0, n_head, n_head_kv, d, d, d if n_rot is None else n_rot, rope_type, 0, base, scale)


def inp(T, layers, group, **kw) -> ScoreInput:
    return ScoreInput(
        positions=kw.pop("positions", np.arange(T, dtype=np.int64)),
        cells=np.arange(T, dtype=np.int32),
        layers=layers,
        group=group,
        next_position=kw.pop("next_position", T),
        **kw,
    )


def direct_rope(x, pos, li, inverse=False):
    """llama.cpp's ggml rope for one vector, written out as its C loop does it."""
    x = [float(v) for v in x]
    out = list(x)
    n_dims = li.n_rot
    sign = -1.0 if inverse else 1.0
    for i0 in range(0, n_dims, 2):
        theta = sign * pos * li.rope_freq_scale * li.rope_freq_base ** (-i0 / n_dims)
        c, s = math.cos(theta), math.sin(theta)
        a, b = (i0, i0 + 1) if li.rope_type == 0 else (i0 // 2, i0 // 2 + n_dims // 2)
        out[a] = x[a] * c - x[b] * s
        out[b] = x[a] * s + x[b] * c
    return np.array(out)


# --- RoPE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_type", [0, 2])
@pytest.mark.parametrize("n_rot", [8, 4])
def test_rope_matches_direct_formula_and_round_trips(rope_type, n_rot):
    li = layer(d=8, n_rot=n_rot, rope_type=rope_type, base=500.0, scale=0.5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 8))
    pos = np.array([0, 1, 7, 100, 12345])
    y = rope_rotate(x, pos, li)
    for t in range(5):
        for h in range(3):
            np.testing.assert_allclose(y[t, h], direct_rope(x[t, h], pos[t], li), atol=1e-12)
    np.testing.assert_allclose(rope_rotate(y, pos, li, inverse=True), x, atol=1e-12)
    np.testing.assert_array_equal(y[..., n_rot:], x[..., n_rot:])
    # the mean rotation matrix is the mean of the per-position ones
    R = rope_mean_matrix(li, pos)
    v = x[0, 0]
    np.testing.assert_allclose(R @ v, np.mean([direct_rope(v, p, li) for p in pos], axis=0), atol=1e-12)


def test_rope_rejects_unknown_type():
    with pytest.raises(NotImplementedError):
        rope_rotate(np.ones(8), 3, layer(rope_type=8))


# --- attention-based scorers ---------------------------------------------------------------


def test_tova_keeps_what_the_last_query_attends_to():
    last = np.zeros((1, 2, 6))
    last[0, 0] = [0.0, 0.1, 1.5, 0.1, 0.3, 0.0]  # summed over a group of 2 heads
    last[0, 1] = [0.2, 0.2, 0.2, 0.2, 0.6, 0.6]
    s = TOVA().score(inp(6, [layer(n_head=4, n_head_kv=2)], 2, attn_last=last))
    np.testing.assert_allclose(s, last / 2)
    assert s.shape == (1, 2, 6) and np.argmax(s[0, 0]) == 2


def test_snapkv_averages_and_pools():
    attn = np.zeros((1, 1, 9))
    attn[0, 0, 4] = 20.0  # 2 queries x 2 heads -> mean probability 5.0
    s = SnapKV(window=2).score(inp(9, [layer()], 2, attn=attn, n_queries=2))
    expected = np.zeros(9)
    expected[2:7] = 5.0 / 5  # kernel 5, centred, divided by 5
    np.testing.assert_allclose(s[0, 0], expected)
    edge = np.zeros((1, 1, 9))
    edge[0, 0, 0] = 4.0  # zero-padded edge: still divided by 5
    s = SnapKV().score(inp(9, [layer()], 1, attn=edge, n_queries=1))
    np.testing.assert_allclose(s[0, 0, :3], [0.8, 0.8, 0.8])
    assert s[0, 0, 3] == 0.0


def test_h2o_accumulates():
    total = np.array([[[3.0, 1.0, 2.0, 0.5]]])
    s = H2O().score(inp(4, [layer()], 1, attn_total=total))
    np.testing.assert_allclose(s, total)
    s = H2O(normalize=True).score(inp(4, [layer()], 1, attn_total=total, next_position=4))
    np.testing.assert_allclose(s[0, 0], [3 / 4, 1 / 3, 2 / 2, 0.5 / 1])
    with pytest.raises(ValueError, match="attn_total"):
        H2O().score(inp(4, [layer()], 1))


def test_streaming_keeps_sinks_and_recent():
    pos = np.array([0, 1, 2, 3, 40, 41, 90, 91, 92], dtype=np.int64)
    s = StreamingLLM().score(inp(9, [layer()], 1, positions=pos, next_position=93))
    assert s.shape == (1, 1, 9) and np.isfinite(s).all()
    keep = np.sort(np.argsort(-s[0, 0], kind="stable")[:6])
    np.testing.assert_array_equal(keep, [0, 1, 2, 3, 7, 8])


def test_rkv_duplicate_scores_below_distinct_with_equal_attention():
    rng = np.random.default_rng(1)
    T, d = 12, 16
    k = rng.normal(size=(T, 1, d))
    k[7] = k[3] * 2.0  # 3 and 7 are the same direction; 5 is distinct
    attn = np.full((1, 1, T), 0.5)
    s = RKV(window=1).score(inp(T, [layer(n_head=1, d=d)], 1, attn=attn, n_queries=1, keys=lambda l: k))
    assert s[0, 0, 3] < s[0, 0, 5] and s[0, 0, 7] < s[0, 0, 5]
    # redundancy term alone: R = softmax(mean cos); A identical for all tokens here
    u = k[:, 0] / np.linalg.norm(k[:, 0], axis=1, keepdims=True)
    C = u @ u.T
    np.fill_diagonal(C, 0)
    r = np.exp(C.sum(0) / T)
    r /= r.sum()
    np.testing.assert_allclose(s[0, 0], 0.1 * 0.5 - 0.9 * r)
    # attention: mean over queries and the group, max-pooled over 7 tokens
    spike = np.zeros((1, 1, T))
    spike[0, 0, 5] = 8.0  # 2 queries x 2 heads -> mean 2.0, reaches tokens 2..8
    s = RKV(mix_lambda=1.0).score(inp(T, [layer(n_head=2, d=d)], 2, attn=spike, n_queries=2, keys=lambda l: k))
    np.testing.assert_allclose(s[0, 0], np.where((np.arange(T) >= 2) & (np.arange(T) <= 8), 2.0, 0.0))


def test_rkv_retain_last_favours_the_newest_copy():
    rng = np.random.default_rng(2)
    T, d = 10, 16
    k = rng.normal(size=(T, 1, d))
    k[6] = k[2]
    k[8] = k[2]
    attn = np.full((1, 1, T), 0.5)
    s = RKV(retain_last=True).score(inp(T, [layer(n_head=1, d=d)], 1, attn=attn, n_queries=1, keys=lambda l: k))
    assert s[0, 0, 8] > s[0, 0, 6] and s[0, 0, 8] > s[0, 0, 2]


# --- key-based scorers -----------------------------------------------------------------------


def test_keydiff_lowest_score_on_the_mean_direction():
    rng = np.random.default_rng(3)
    d = 6
    axis = np.eye(d)[0]
    k = np.empty((7, 1, d))
    for t in range(6):  # a symmetric fan around `axis`
        k[t, 0] = axis + 0.8 * (np.eye(d)[1 + t // 2] * (1 if t % 2 else -1))
    k[6, 0] = 3.0 * axis  # on the mean direction
    k *= rng.uniform(0.5, 2.0, size=(7, 1, 1))  # norms do not matter
    s = KeyDiff().score(inp(7, [layer(n_head=1, d=d)], 1, keys=lambda l: k))
    assert np.argmin(s[0, 0]) == 6
    np.testing.assert_allclose(s[0, 0, 6], -1.0, atol=1e-12)


@pytest.mark.parametrize("rope_type", [0, 2])
def test_expected_attention_ranks_the_aligned_key_first(rope_type, products):
    """Queries all point one way (pre-RoPE u); the key aligned with u as the *future* queries will
    see it (rotated to around next_position) wins, not the one aligned with u itself, nor the one
    aligned with the observed queries as they were stored (post-RoPE)."""
    li = layer(n_head=2, n_head_kv=1, d=4, rope_type=rope_type, base=1e4)  # pair 1 turns 0.01/position
    re, im = (2, 3) if rope_type == 0 else (1, 3)
    w, nxt, n_future = 0.01, 400, 16

    def vec(angle, r=1.0):
        v = np.zeros(4)
        v[re], v[im] = r * np.cos(angle), r * np.sin(angle)
        return v

    a0 = 0.3
    qpos = np.arange(nxt - 4, nxt)
    rng = np.random.default_rng(4)
    q = np.stack([[vec(a0 + w * p) + 0.01 * rng.normal(size=4) for _ in range(2)] for p in qpos])
    target = a0 + w * (nxt + (n_future - 1) / 2)  # where the future queries point
    angles = [target + 1, a0, a0 + w * (2 * nxt), target, target - 1.5, target + 2.5, target - 3]
    aligned = 3
    k = np.stack([vec(a, 2.0) for a in angles])[:, None, :]  # post-RoPE keys as stored
    T = k.shape[0]
    v = np.ones((T, 1, 4))
    s = ExpectedAttention(n_sink=1, n_future_positions=n_future).score(
        inp(
            T,
            [li],
            2,
            next_position=nxt,
            positions=np.arange(T) * 50,
            queries=[q],
            query_positions=qpos,
            keys=lambda l: k,
            values=lambda l: v,
        )
    )
    assert s.shape == (1, 1, T)
    assert np.argmax(s[0, 0, 1:]) + 1 == aligned
    np.testing.assert_allclose(s[0, 0, 0], s[0, 0, 1:].max())
    # values scale the score by their norm
    v2 = v.copy()
    v2[5] *= 3
    s2 = ExpectedAttention(n_sink=1, n_future_positions=n_future).score(
        inp(
            T,
            [li],
            2,
            next_position=nxt,
            positions=np.arange(T) * 50,
            queries=[q],
            query_positions=qpos,
            keys=lambda l: k,
            values=lambda l: v2,
        )
    )
    np.testing.assert_allclose(s2[0, 0, 5], 3 * s[0, 0, 5])


@pytest.mark.parametrize("W", [5, 11])  # a window shorter and longer than the head (two code paths)
def test_expected_attention_equals_direct_formula(W, products):
    li = layer(n_head=4, n_head_kv=2, d=6, rope_type=2, base=50.0, scale=0.7)
    rng = np.random.default_rng(8)
    T, nxt, n_future, n_sink = 9, 60, 8, 2
    qpos = np.arange(nxt - W, nxt)
    q = rng.normal(size=(W, 4, 6))
    k = rng.normal(size=(T, 2, 6))
    v = rng.normal(size=(T, 2, 6))
    s = ExpectedAttention(window=W, n_future_positions=n_future, n_sink=n_sink).score(
        inp(T, [li], 2, next_position=nxt, queries=[q], query_positions=qpos, keys=lambda l: k, values=lambda l: v)
    )[0]
    # direct: un-rotate each query, mean/cov, R = mean of rotation matrices (columns = rotated e_i)
    R = np.mean(
        [np.stack([direct_rope(e, p, li) for e in np.eye(6)], axis=1) for p in range(nxt, nxt + n_future)], axis=0
    )
    want = np.zeros((2, T))
    for h in range(4):
        pre = np.stack([direct_rope(q[t, h], qpos[t], li, inverse=True) for t in range(W)])
        mu = pre.mean(0)
        cov = (pre - mu).T @ (pre - mu) / W
        mu, cov = R @ mu, R @ cov @ R.T
        logits = np.array(
            [k[j, h // 2] @ mu / np.sqrt(6) + k[j, h // 2] @ cov @ k[j, h // 2] / 12 for j in range(n_sink, T)]
        )
        p = np.exp(logits - logits.max())
        want[h // 2, n_sink:] += p / p.sum() / 2
    want = (want + 1e-2) * np.linalg.norm(v, axis=-1).T  # the reference evaluation's epsilon
    want[:, :n_sink] = want[:, n_sink:].max(axis=1, keepdims=True)
    # the queries are un-rotated and centred in float32 (as captured), and a window longer than
    # the head computes Sigma' in float32 too (the scores only rank tokens)
    np.testing.assert_allclose(s, want, rtol=1e-6 if W <= 6 else 1e-5)


def _kernel_results(monkeypatch) -> list:
    """What every call of the Expected Attention kernel returns from now on (None: not taken)."""
    from amslocal.scorers import expected_attention

    ran = []
    run = expected_attention.expected_attention_scores
    monkeypatch.setattr(expected_attention, "expected_attention_scores", lambda *a: ran.append(run(*a)) or ran[-1])
    return ran


@pytest.mark.parametrize("seed", range(4))
def test_expected_attention_kernel_equals_numpy_layers(seed, monkeypatch):
    """The one-kernel path (every layer, BLAS from the kernel's threads) gives the numpy path's
    scores: GQA groups, both RoPE layouts, two RoPE bases, sinks (none, some, every key), with
    and without value norms."""
    from amslocal import compute_threads

    compute_threads.use(2)
    if compute_threads.kernel_sgemm() is None or compute_threads.kernel_ssyrk() is None:
        pytest.skip("numpy's BLAS here has no cblas_sgemm and cblas_ssyrk to call from kernels")
    rng = np.random.default_rng(20 + seed)
    H, G, d = int(rng.integers(1, 4)), int(rng.integers(1, 4)), 2 * int(rng.integers(2, 9))
    T, W, L = int(rng.integers(1, 30)), d + int(rng.integers(1, 20)), int(rng.integers(2, 6))
    rope_type = [0, 2][seed % 2]
    layers = [layer(n_head=H * G, n_head_kv=H, d=d, rope_type=rope_type, base=[100.0, 1e4][l % 2]) for l in range(L)]
    # queries with a mean and an uneven spread (isotropic ones would hide a wrong turn); the last W count
    qs = [
        (rng.normal(size=(W + 3, H * G, d)) * rng.uniform(0.2, 3, d) + rng.normal(size=d)).astype(np.float32)
        for _ in layers
    ]
    ks = [rng.normal(size=(T, H, d)).astype(np.float32) for _ in layers]
    vs = [rng.normal(size=(T, H, d)).astype(np.float32) for _ in layers]
    scorer = ExpectedAttention(window=W, n_sink=[0, 4, 1, T + 1][seed], use_vnorm=bool(seed % 2))
    case = inp(
        T, layers, G, next_position=80, queries=qs, query_positions=np.arange(80 - W, 80),
        keys=lambda l: ks[l], values=lambda l: vs[l],
    )  # fmt: skip
    ran = _kernel_results(monkeypatch)
    kernel = scorer.score(case)
    assert ran and ran[0] is not None  # the kernel took every layer
    monkeypatch.setattr(compute_threads, "kernel_sgemm", lambda: None)
    np.testing.assert_allclose(kernel, scorer.score(case), rtol=2e-5, atol=1e-9)


def test_expected_attention_scores_the_same_on_two_threads(products):
    """Its layers run on the session's threads (compute_threads.map_layers): the same numbers."""
    from amslocal import compute_threads

    rng = np.random.default_rng(3)
    layers = [layer(n_head=4, n_head_kv=2, d=8, rope_type=2, base=100.0) for _ in range(5)]
    T, W = 12, 16
    qs = [rng.normal(size=(W, 4, 8)).astype(np.float32) for _ in layers]
    ks = [rng.normal(size=(T, 2, 8)).astype(np.float32) for _ in layers]
    vs = [rng.normal(size=(T, 2, 8)).astype(np.float32) for _ in layers]

    def score():
        return ExpectedAttention(window=W, n_sink=1).score(
            inp(
                T,
                layers,
                2,
                next_position=40,
                queries=qs,
                query_positions=np.arange(24, 40),
                keys=lambda l: ks[l],
                values=lambda l: vs[l],
            )
        )

    compute_threads.use(1)
    one = score()
    compute_threads.use(2)
    try:
        np.testing.assert_array_equal(score(), one)
    finally:
        compute_threads.use(1)
    assert not np.array_equal(one[0], one[1])  # the layers really differ (and stay in order)


# --- TriAttention ------------------------------------------------------------------------------


def direct_triattention(k_post, pos, next_pos, li, q_mean, q_abs, group, offset_max):
    """The series evaluated term by term (pure Python loops), z-scored per head, group mean."""
    T, Hkv, d = k_post.shape
    F = li.n_rot // 2
    offsets = []
    o = 1
    while o <= offset_max:
        offsets.append(o)
        o *= 2
    per_head = np.zeros((li.n_head, T))
    for h in range(li.n_head):
        for j in range(T):
            kp = direct_rope(k_post[j, h // group], pos[j], li, inverse=True)
            total = 0.0
            for o in offsets:
                dist = next_pos + o - pos[j]  # query position minus key position
                for f in range(F):
                    a, b = (2 * f, 2 * f + 1) if li.rope_type == 0 else (f, f + F)
                    kf = complex(kp[a], kp[b])
                    w = li.rope_freq_scale * li.rope_freq_base ** (-2 * f / li.n_rot)
                    ez = q_mean[h, f]
                    total += abs(ez) * abs(kf) * math.cos(w * dist + np.angle(ez) - np.angle(kf))
                    total += (q_abs[h, f] - abs(ez)) * abs(kf)
            per_head[h, j] = total / len(offsets)
    z = (per_head - per_head.mean(1, keepdims=True)) / per_head.std(1, keepdims=True)
    return z.reshape(Hkv, group, T).mean(1)


@pytest.mark.parametrize("rope_type", [0, 2])
def test_triattention_equals_direct_series(rope_type):
    li = layer(n_head=4, n_head_kv=2, d=8, rope_type=rope_type, base=100.0, scale=0.5)
    rng = np.random.default_rng(5)
    q = rng.normal(size=(50, 4, 8)) + np.array([1.0, -0.5, 0.2, 0, 0.7, 0, 0, 0.3])
    stats = calibration_stats([q], [li])
    pos = np.array([0, 3, 4, 10, 11, 30], dtype=np.int64)
    k = rng.normal(size=(6, 2, 8))
    s = TriAttention(offset_max_length=64).score(
        inp(6, [li], 2, positions=pos, next_position=37, keys=lambda l: k, calibration=stats)
    )
    want = direct_triattention(k, pos, 37, li, stats["q_mean"][0], stats["q_abs_mean"][0], 2, 64)
    np.testing.assert_allclose(s[0], want, atol=1e-9)


@pytest.mark.parametrize("rope_type", [0, 2])
def test_triattention_with_one_query_is_its_future_logit(rope_type):
    """Calibrated on a single query (so E|z| = |E z|) with the one offset o = 1 and no z-scoring,
    the score is exactly that query's logit, placed at next_position + 1, on each cached key."""
    li = layer(n_head=2, n_head_kv=1, d=8, n_rot=6, rope_type=rope_type, base=300.0)
    rng = np.random.default_rng(9)
    q_pre = rng.normal(size=(1, 2, 8))
    stats = calibration_stats([q_pre], [li])
    pos = np.array([2, 5, 9, 20], dtype=np.int64)
    k = rng.normal(size=(4, 1, 8))  # post-RoPE, as cached
    nxt = 33
    s = TriAttention(offset_max_length=1, normalize=False, group_reduce="max").score(
        inp(4, [li], 2, positions=pos, next_position=nxt, keys=lambda l: k, calibration=stats)
    )
    q_future = rope_rotate(q_pre[0], nxt + 1, li)  # [2, 8]
    logits = k[:, 0, :] @ q_future.T  # [T, n_head]
    np.testing.assert_allclose(s[0, 0], logits.max(axis=1), atol=1e-12)


def test_calibration_stats_and_file_round_trip(tmp_path):
    li = layer(n_head=2, n_head_kv=1, d=8, n_rot=4, rope_type=2)
    rng = np.random.default_rng(6)
    q = rng.normal(size=(20, 2, 8))
    stats = calibration_stats([q], [li])
    z = q[..., [0, 1]] + 1j * q[..., [2, 3]]  # NEOX with n_rot 4: pairs (0, 2), (1, 3)
    np.testing.assert_allclose(stats["q_mean"][0], z.mean(0))
    np.testing.assert_allclose(stats["q_abs_mean"][0], np.abs(z).mean(0))
    np.testing.assert_allclose(stats["q_rest_mean"][0], q[..., 4:].mean(0))
    # post-RoPE queries with their positions give the same statistics
    pos = np.arange(100, 120)
    again = calibration_stats([rope_rotate(q, pos, li)], [li], positions=pos)
    np.testing.assert_allclose(again["q_mean"][0], stats["q_mean"][0], atol=1e-12)
    # merging two halves equals calibrating on the whole
    merged = merge_calibration(calibration_stats([q[:7]], [li]), calibration_stats([q[7:]], [li]))
    np.testing.assert_allclose(merged["q_mean"][0], stats["q_mean"][0], atol=1e-12)
    np.testing.assert_allclose(merged["q_abs_mean"][0], stats["q_abs_mean"][0], atol=1e-12)
    path = save_calibration(tmp_path / "cal", stats, {"model": "tiny"})
    loaded = load_calibration(path)
    assert loaded["meta"] == {"model": "tiny"}
    for key in ("q_mean", "q_abs_mean", "q_rest_mean"):
        np.testing.assert_array_equal(loaded[key][0], stats[key][0])
    check_calibration(loaded, [li])
    with pytest.raises(ValueError, match="does not match"):
        check_calibration(loaded, [layer(n_head=2, n_head_kv=1, d=8, n_rot=4, rope_type=0)])


# --- kernels against their references --------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_kernels_equal_references(seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 40))
    x = rng.normal(size=(3, T))
    for kern in (1, 3, 5, 7):
        np.testing.assert_allclose(kernels.avg_pool_rows(x, kern), kernels.avg_pool_rows_ref(x, kern))
        np.testing.assert_allclose(kernels.max_pool_rows(x, kern), kernels.max_pool_rows_ref(x, kern))
    keys = rng.normal(size=(T, 2, 6))
    keys[0, 0] = 0.0  # a zero key
    if T > 3:
        keys[3] = keys[1] * 1.5
    np.testing.assert_allclose(kernels.cos_to_mean_direction(keys), kernels.cos_to_mean_direction_ref(keys), atol=1e-12)
    n, F = T, 3
    q = rng.normal(size=(n, 4, 8)).astype(np.float32)
    theta = rng.uniform(-50, 50, size=(n, F))
    r = rng.uniform(0.2, 1.0, size=(n, F))  # a factor that is no unit turn (a mean rotation)
    # NORM (adjacent dims), NEOX (the halves), and any other pairing (the kernel's indexed loop)
    layouts = (np.arange(0, 6, 2), np.arange(1, 6, 2)), (np.arange(3), np.arange(3, 6)), ([4, 0, 2], [7, 1, 5])
    for re, im in layouts:
        re, im = np.asarray(re, dtype=np.int64), np.asarray(im, dtype=np.int64)
        got = kernels.turn_center(q, r * np.cos(theta), r * np.sin(theta), re, im)
        want = kernels.turn_center_ref(q, r * np.cos(theta), r * np.sin(theta), re, im)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    for retain in (False, True):
        for thr in (0.0, 0.5):
            np.testing.assert_allclose(
                kernels.mean_cos_redundancy(keys, retain, thr),
                kernels.mean_cos_redundancy_ref(keys, retain, thr),
                atol=1e-12,
            )
    F, n_head, group = 4, 4, 2
    args = (
        rng.normal(size=(T, 2, F)),
        rng.normal(size=(T, 2, F)),
        rng.normal(size=(n_head, F)),
        rng.normal(size=(n_head, F)),
        rng.uniform(1, 2, size=(n_head, F)),
        10000.0 ** (-np.arange(F) / F),
        rng.integers(1, 5000, size=T).astype(np.float64),
        2.0 ** np.arange(17),
        group,
    )
    np.testing.assert_allclose(kernels.tri_series(*args), kernels.tri_series_ref(*args), rtol=1e-9, atol=1e-9)


# --- every scorer, random input -----------------------------------------------------------------


def random_input(rng, rope_type=0) -> ScoreInput:
    L, n_head, Hkv, d, T, W = 2, 4, 2, 8, 40, 6
    layers = [layer(n_head=n_head, n_head_kv=Hkv, d=d, rope_type=rope_type, n_rot=6 if l else 8) for l in range(L)]
    keys = rng.normal(size=(L, T, Hkv, d)).astype(np.float32)
    values = rng.normal(size=(L, T, Hkv, d)).astype(np.float32)
    attn = rng.uniform(size=(L, Hkv, T))
    pos = np.sort(rng.choice(200, size=T, replace=False)).astype(np.int64)
    cal = calibration_stats([rng.normal(size=(30, n_head, d)) for _ in range(L)], layers)
    return ScoreInput(
        positions=pos,
        cells=rng.permutation(T).astype(np.int32),
        layers=layers,
        group=n_head // Hkv,
        next_position=int(pos[-1]) + 1,
        attn=attn * W * 2,
        n_queries=W,
        attn_last=attn * 2,
        attn_total=attn * 50,
        queries=[rng.normal(size=(W, n_head, d)).astype(np.float32) for _ in range(L)],
        query_positions=pos[-W:],
        keys=lambda l: keys[l],
        values=lambda l: values[l],
        calibration=cal,
    )


@pytest.mark.parametrize("rope_type", [-1, 0, 2])
@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_shape_and_finite(name, rope_type):
    x = random_input(np.random.default_rng(7), rope_type)
    scorer = make_scorer(name)
    assert scorer.name == name and isinstance(scorer.needs, frozenset) and scorer.window >= 0
    s = scorer.score(x)
    assert s.dtype == np.float64
    assert s.shape in ((2, 2, 40), (1, 1, 40))
    assert np.isfinite(s).all()


def test_make_scorer_errors_and_params():
    with pytest.raises(ValueError, match="choices: .*expected-attention.*triattention"):
        make_scorer("nope")
    with pytest.raises(ValueError, match="no parameter bogus"):
        make_scorer("snapkv", bogus=1)
    assert make_scorer("snapkv", window=64).window == 64
    assert make_scorer("rkv").mix_lambda == 0.1


def test_expected_attention_kernel_equals_numpy_path_at_real_events(smollm2_model, monkeypatch):
    """SmolLM2's own queries, keys and values at a session's events (256 queries over 64-dim
    heads: the kernel's case): the kernel's scores equal the numpy path's."""
    from amslocal import compute_threads
    from amslocal.backend import ContextParams, SamplerParams
    from amslocal.session import CompressionConfig, Session

    compared = []
    score = ExpectedAttention.score

    def both(self, inp):
        kernel = score(self, inp)
        with monkeypatch.context() as m:
            m.setattr(compute_threads, "kernel_sgemm", lambda: None)
            numpy_path = score(self, inp)
        np.testing.assert_allclose(kernel, numpy_path, rtol=2e-5, atol=1e-9)
        compared.append(kernel.shape)
        return kernel

    ran = _kernel_results(monkeypatch)
    monkeypatch.setattr(ExpectedAttention, "score", both)
    cfg = CompressionConfig(budget=128, interval=64, scorer="expected-attention", ams=True)
    s = Session(smollm2_model, cfg, ContextParams(n_threads=2), SamplerParams(temp=0))
    s.prefill(smollm2_model.tokenize("The lighthouse keeper counted the ships every evening. " * 40))
    for _ in s.generate([], 320, ignore_eos=True):
        pass
    assert len(compared) >= 3 and all(out is not None for out in ran) and len(ran) >= len(compared)
    assert any(n_layers == 30 and T >= 128 for n_layers, _, T in compared)
