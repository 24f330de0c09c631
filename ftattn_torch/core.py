"""The unfused schemes in eager PyTorch: S = scale·QKᵀ, softmax (optionally twice),
O = P·V, and the checks. ``api.attention`` validates and calls :func:`run`."""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ftattn_spec.report import Report
from ftattn_spec.schemes import SCHEMES

from . import checks

F32 = torch.float32
NEG = torch.finfo(F32).min  # masked logits: large, finite, so no row is NaN
LOG2E = math.log2(math.e)


def _bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """Batched a @ b with float32 accumulation and a float32 result.

    On CUDA, float16/bfloat16 operands go to the tensor cores with a float32
    output (``out_dtype``); elsewhere the operands are upcast, which is exact.
    Either way the products are exact and the sums are float32.
    """
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=F32)
    return torch.bmm(a.to(F32), b.to(F32))


def uses_tf32(x: Tensor) -> bool:
    """Whether float32 matrix products on ``x``'s device may run at TF32 precision."""
    return x.is_cuda and torch.get_float32_matmul_precision() != "highest"


def _softmax(s: Float[Tensor, "B N T S"]) -> Float[Tensor, "B N T S"]:
    """Replica 1: PyTorch's softmax (masked logits hold NEG, whose exp is 0)."""
    return torch.softmax(s, dim=-1)


def _softmax_replica(s: Float[Tensor, "B N T S"], mask: Bool[Tensor, "T S"] | None) -> Float[Tensor, "B N T S"]:
    """Replica 2: an independent evaluation with a different formula (base-2
    exponential of the rescaled argument, a two-level sum, product with the
    reciprocal sum)."""
    z = (s - s.amax(-1, keepdim=True)).mul_(LOG2E).exp2_()
    if mask is not None:
        z.masked_fill_(~mask, 0.0)
    return z.mul_(1.0 / checks.blocked_sum(z, -1)[..., None])


def _inject(x: Tensor, site: str, perturb) -> Tensor:
    """Add ``delta`` at logical ``(b, n, i, j)`` of ``x`` (``B N T S``, or ``B N T H``
    for the output) if ``perturb`` targets ``site``. A private test hook."""
    if perturb is None or perturb[0] != site:
        return x
    _, (b, n, i, j), delta = perturb
    x = x.clone()
    x[b, n, i, j] += delta
    return x


def run(query: Float[Tensor, "B N T H"], key: Float[Tensor, "B K S H"], value: Float[Tensor, "B K S H"], *,
        scheme: str, granularity: str, scale: float, is_causal: bool, perturb=None):
    B, N, T, H = query.shape
    K, S = key.shape[1], key.shape[2]
    G = N // K
    dtype = str(query.dtype).removeprefix("torch.")
    wanted = SCHEMES[scheme].checks
    tf32 = uses_tf32(query)

    qg = query.reshape(B, K, G, T, H)
    s = _bmm_f32(qg.reshape(B * K, G * T, H), key.reshape(B * K, S, H).transpose(1, 2))
    s = _inject(s.reshape(B, N, T, S).mul_(scale), "scores", perturb)
    mask = None
    if is_causal:
        mask = torch.arange(S, device=query.device)[None, :] <= torch.arange(T, device=query.device)[:, None]
    qk_checks = {"qk_row", "qk_col"} & set(wanted)
    # masked entries are excluded from the checksums (0) and from the softmax (NEG)
    s_masked = s if mask is None or not qk_checks else torch.where(mask, s, 0.0)
    s_soft = s if mask is None else s.masked_fill_(~mask, NEG)  # s itself is not needed again

    found = {}
    with torch.no_grad():  # the checks never need a backward graph
        if "qk_row" in wanted:
            found["qk_row"] = checks.qk_row(qg, key, s_masked, scale, is_causal, dtype, tf32)
        if "qk_col" in wanted:
            found["qk_col"] = checks.qk_col(qg, key, s_masked, scale, is_causal, dtype, tf32)

    p = _inject(_softmax(s_soft), "probs", perturb)
    if "softmax_dmr" in wanted:
        with torch.no_grad():
            p_replica = _inject(_softmax_replica(s_soft, mask), "probs_replica", perturb)
            found["softmax_dmr"] = checks.softmax_dmr(p, p_replica)

    del s, s_masked, s_soft  # autograd keeps what it needs; free the rest early
    p_mma = p.to(query.dtype).reshape(B * K, G * T, S)
    del p
    o = _bmm_f32(p_mma, value.reshape(B * K, S, H))  # BK GT H
    o = _inject(o.reshape(B, N, T, H), "out", perturb).reshape(B * K, G * T, H)
    with torch.no_grad():
        if "pv_row" in wanted:
            found["pv_row"] = checks.pv_row(o, p_mma, value, N, dtype, tf32)
        results = {
            name: checks.verdict(*found[name], granularity, signed=(name != "softmax_dmr"))
            for name in wanted
        }
        detected = torch.zeros((), dtype=torch.bool, device=query.device)
        for r in results.values():
            detected = detected | r.flagged.any()
        finite = torch.isfinite(query).all() & torch.isfinite(key).all() & torch.isfinite(value).all()
    out = o.reshape(B, N, T, H).to(query.dtype)
    return out, Report(detected=detected, checks=results, inputs_finite=finite)
