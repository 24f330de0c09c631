"""Bad input raises ValueError or TypeError naming the argument; NaN/Inf inputs never crash."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import SHAPE, draw_qkv


@pytest.fixture
def qkv(backend):
    return tuple(backend.array(x, "float32") for x in draw_qkv(0, "normal", **SHAPE))


def _cast(backend, x, dtype):
    if backend.name == "jax":  # numpy: jax without x64 would silently truncate float64
        return np.asarray(x).astype(dtype)
    import torch

    return x.to(getattr(torch, dtype))


CASES = [
    # (description, builder(backend, q, k, v) -> (args, kwargs), exception, words in message)
    ("query rank 3", lambda b, q, k, v: ((q[0], k, v), {}), ValueError, ["query", "rank"]),
    ("key rank 5", lambda b, q, k, v: ((q, k[None], v), {}), ValueError, ["key", "rank"]),
    ("value shape", lambda b, q, k, v: ((q, k, v[:, :, :, :8] if b.name == "torch" else v[..., :8]), {}),
     ValueError, ["value"]),
    ("head dim", lambda b, q, k, v: ((q[..., :8], k, v), {}), ValueError, ["head dim"]),
    ("batch", lambda b, q, k, v: ((q[:2], k, v), {}), ValueError, ["batch"]),
    ("kv heads", lambda b, q, k, v: ((q, *(_kv_heads(b, x, 4) for x in (k, v))), {}), ValueError,
     ["kv heads"]),
    ("int dtype", lambda b, q, k, v: ((_cast(b, q, "int32"), k, v), {}), TypeError, ["query", "floating"]),
    ("float64", lambda b, q, k, v: ((q, k, _cast(b, v, "float64")), {}), TypeError, ["value", "float64"]),
    ("mixed dtypes", lambda b, q, k, v: ((q, _cast(b, k, "float16"), _cast(b, v, "float16")), {}), TypeError,
     ["dtype", "float16", "float32"]),
    ("scheme", lambda b, q, k, v: ((q, k, v), {"scheme": "tmr"}), ValueError, ["scheme", "tmr", "full"]),
    ("scheme type", lambda b, q, k, v: ((q, k, v), {"scheme": 3}), TypeError, ["scheme"]),
    ("granularity", lambda b, q, k, v: ((q, k, v), {"granularity": "element"}), ValueError,
     ["granularity", "element", "vector"]),
    ("scale negative", lambda b, q, k, v: ((q, k, v), {"scale": -1.0}), ValueError, ["scale", "-1.0"]),
    ("scale zero", lambda b, q, k, v: ((q, k, v), {"scale": 0}), ValueError, ["scale"]),
    ("scale nan", lambda b, q, k, v: ((q, k, v), {"scale": float("nan")}), ValueError, ["scale", "nan"]),
    ("scale inf", lambda b, q, k, v: ((q, k, v), {"scale": float("inf")}), ValueError, ["scale", "inf"]),
    ("scale str", lambda b, q, k, v: ((q, k, v), {"scale": "0.1"}), TypeError, ["scale", "str"]),
    ("scale bool", lambda b, q, k, v: ((q, k, v), {"scale": True}), TypeError, ["scale", "bool"]),
    ("is_causal int", lambda b, q, k, v: ((q, k, v), {"is_causal": 1}), TypeError, ["is_causal", "int"]),
    ("query list", lambda b, q, k, v: (([[1.0]], k, v), {}), TypeError, ["query", "list"]),
]


def _kv_heads(backend, x, n):
    """A fresh kv array with ``n`` heads (N=6 is not divisible by 4)."""
    _, k, _ = draw_qkv(3, "normal", **dict(SHAPE, K=n))
    return backend.array(k, "float32")


@pytest.mark.parametrize("desc,build,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(backend, qkv, desc, build, exc, words):
    args, kwargs = build(backend, *qkv)
    with pytest.raises(exc) as info:
        backend.attention(*args, **kwargs)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{desc}: {w!r} not in {msg!r}"
    assert "expected" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_non_finite_inputs_report_and_never_crash(backend, bad, where):
    q, k, v = draw_qkv(1, "normal", **SHAPE)
    arrays = {"query": q, "key": k, "value": v}
    arrays[where][0, 1, 2, 3] = bad
    q, k, v = (backend.array(arrays[n], "float16") for n in ("query", "key", "value"))
    out, rep = backend.attention(q, k, v)
    rep = backend.numpy_report(rep)
    assert not bool(rep.inputs_finite)
    assert bool(rep.detected)  # checks that cannot be verified fail closed
    o = backend.logical(out)
    assert not np.isfinite(o).all()
    # batch 1 never saw the bad value: its rows are clean and unflagged
    assert np.isfinite(o[1]).all()
    for c in rep.checks.values():
        assert not c.flagged[1].any()


def test_clean_inputs_report_finite(backend, qkv):
    _, rep = backend.attention(*qkv, scheme="baseline")
    rep = backend.numpy_report(rep)
    assert bool(rep.inputs_finite) and not bool(rep.detected) and rep.checks == {}
