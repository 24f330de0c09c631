"""The unfused schemes: S = scale·QKᵀ, softmax (optionally twice), O = P·V, and the checks.

Everything here runs under ``jax.jit``; ``api.attention`` validates arguments
and calls :func:`run` with static settings.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from ftattn_spec.report import Report
from ftattn_spec.schemes import SCHEMES

from . import checks

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)  # masked logits: large, finite, so no row is NaN
LOG2E = math.log2(math.e)


def _precision(dtype: str):
    # float32 inputs get true float32 products (no TF32), as the tolerance
    # model assumes; float16/bfloat16 products are exact at any precision.
    return lax.Precision.HIGHEST if dtype == "float32" else None


def _softmax(s: Float[Array, "B N T S"], mask: Bool[Array, "T S"] | None) -> Float[Array, "B N T S"]:
    """Replica 1: exp(s - m) / Σ exp(s - m)."""
    z = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    if mask is not None:
        z = jnp.where(mask, z, 0.0)
    return z / jnp.sum(z, axis=-1, keepdims=True)


def _softmax_replica(s: Float[Array, "B N T S"], mask: Bool[Array, "T S"] | None) -> Float[Array, "B N T S"]:
    """Replica 2: an independent evaluation that the compiler cannot merge with replica 1.

    It uses a different formula (a base-2 exponential of the argument scaled by
    log₂ e, a two-level sum, a multiply by the reciprocal sum), and both its
    input and the constant log₂ e pass an optimization barrier. The constant
    matters: ``exp2(y)`` lowers to ``exp(y·ln 2)``, float32 ``log₂ e · ln 2``
    is exactly 1, and XLA folds the two constants and then merges the two
    exponentials (seen with jax 0.10.2 on CPU). ``tests/test_jax_backend.py``
    counts the exponentials in the compiled HLO.
    """
    s, log2e = lax.optimization_barrier((s, jnp.float32(LOG2E)))
    z = jnp.exp2((s - jnp.max(s, axis=-1, keepdims=True)) * log2e)
    if mask is not None:
        z = jnp.where(mask, z, 0.0)
    return z * (1.0 / checks.blocked_sum(z, -1)[..., None])


def _inject(x: Array, site: str, perturb) -> Array:
    """Add ``delta`` at logical ``(b, n, i, j)`` of ``x`` if ``perturb`` targets ``site``.

    ``x`` is ``B N T S`` for scores and probabilities and ``B T N H`` for the
    output. A private test hook: the index and delta are traced, so one
    compiled function serves every perturbation.
    """
    if perturb is None or perturb[0] != site:
        return x
    _, (b, n, i, j), delta = perturb
    idx = (b, i, n, j) if site == "out" else (b, n, i, j)
    return x.at[idx].add(jnp.asarray(delta, x.dtype))


def _split_perturb(perturb):
    if perturb is None:
        return None, None
    site, index, delta = perturb
    return site, (jnp.asarray(index, jnp.int32), jnp.asarray(delta, F32))


def run(query, key, value, *, scheme: str, granularity: str, scale: float, is_causal: bool, perturb=None):
    site, data = _split_perturb(perturb)
    return _run(query, key, value, data, scheme=scheme, granularity=granularity, scale=scale,
                is_causal=is_causal, site=site)


@functools.partial(jax.jit, static_argnames=("scheme", "granularity", "scale", "is_causal", "site"))
def _run(query: Float[Array, "B T N H"], key: Float[Array, "B S K H"], value: Float[Array, "B S K H"],
         perturb_data, *, scheme: str, granularity: str, scale: float, is_causal: bool, site: str | None):
    perturb = None if site is None else (site, tuple(perturb_data[0]), perturb_data[1])
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    G = N // K
    dtype = jnp.dtype(query.dtype).name
    wanted = SCHEMES[scheme].checks
    prec = _precision(dtype)

    qg = query.reshape(B, T, K, G, H)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, key, precision=prec, preferred_element_type=F32)
    s = _inject(s.reshape(B, N, T, S) * scale, "scores", perturb)
    if "softmax_dmr" in wanted:
        # Both replicas must read one stored S: left to itself XLA may
        # recompute scale·(QKᵀ) inside one replica's fusion with a fused
        # multiply-add, and the replicas then see logits that differ by a
        # rounding of |s|, which the DMR bound does not cover (seen on CPU:
        # a clean row flagged). Without the DMR nothing needs this, and the
        # barrier costs time and memory, so baseline does without it.
        s = lax.optimization_barrier(s)
    mask = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] if is_causal else None
    s_masked = s if mask is None else jnp.where(mask, s, 0.0)
    s_soft = s if mask is None else jnp.where(mask, s, NEG)

    found = {}
    if "qk_row" in wanted:
        found["qk_row"] = checks.qk_row(qg, key, s_masked, scale, is_causal, dtype)
    if "qk_col" in wanted:
        found["qk_col"] = checks.qk_col(qg, key, s_masked, scale, is_causal, dtype)

    p = _inject(_softmax(s_soft, mask), "probs", perturb)
    if "softmax_dmr" in wanted:
        p_replica = _inject(_softmax_replica(s_soft, mask), "probs_replica", perturb)
        found["softmax_dmr"] = checks.softmax_dmr(p, p_replica)

    p_mma = p.astype(query.dtype).reshape(B, K, G, T, S)
    if "pv_row" in wanted:
        p_mma = lax.optimization_barrier(p_mma)  # the GEMM and the prediction read the same P̂
    o = jnp.einsum("bkgts,bskh->btkgh", p_mma, value, precision=prec, preferred_element_type=F32)
    o = _inject(o.reshape(B, T, N, H), "out", perturb).reshape(B, T, K, G, H)
    if "pv_row" in wanted:
        found["pv_row"] = checks.pv_row(o, p_mma, value, dtype)

    results = {
        name: checks.verdict(*found[name], granularity, signed=(name != "softmax_dmr"))
        for name in wanted
    }
    detected = jnp.zeros((), bool)
    for r in results.values():
        detected = detected | jnp.any(r.flagged)
    finite = jnp.all(jnp.isfinite(query)) & jnp.all(jnp.isfinite(key)) & jnp.all(jnp.isfinite(value))
    out = o.reshape(B, T, N, H).astype(query.dtype)
    return out, Report(detected=detected, checks=results, inputs_finite=finite)


