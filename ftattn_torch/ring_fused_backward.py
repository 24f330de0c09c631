"""The backward of ring attention by the fused Triton kernels, checked: each step's block is one
launch of the fused backward (:func:`ftattn_torch.fused.launch.backward`), given the forward's
merged log-sum-exp, so that P is recomputed tile by tile and never stored (memory O(B·N·Tc)
beyond the chunks and gradients, where :mod:`.ring_backward` holds one ``(B, N, Tc, Sc)``
block per step).

The chunk of keys and values travels around the ring as in :mod:`.ring_backward`, with its
float32 accumulators ``dK``, ``dV``, their travelling row sums (``bwd_transit``) and its keys'
worst ratios. Each launch judges its own products (``fused.launch.BACKWARD_ROW_CHECKS`` and
``BACKWARD_KEY_CHECKS``, thresholds of ``ftattn_spec.backward_tolerances`` for the block's
``Tc × Sc``); what no block can judge alone is judged here over all steps:

* ``bwd_softmax``: each row's Σ p, added over the steps, against 1 (``ftattn_spec.ring_fused_backward``);
* ``bwd_softmax_kv``: the dK/dV kernel's totals of P per head group, added over the steps,
  against the attended rows.

Faults of a ``RingPlan`` at the kernel's sites (``bwd_scores`` … ``bwd_dv``) are injected by the
kernel of their step; the accumulators' (``bwd_dk_acc``, ``bwd_dv_acc``) here.
"""

from __future__ import annotations

import math

import torch

from ftattn_spec import faults as spec_faults
from ftattn_spec import ring_fused_backward as spec
from ftattn_spec.backward_blocks import BackwardBlocks

from . import faults, fused
from .ring_backward import BackwardChecks, _bad, _carry, _ratio, _send, _transit, _worst

ROW_CHECKS, KEY_CHECKS, GROUP_CHECKS = spec.ROW_CHECKS, spec.KEY_CHECKS, spec.GROUP_CHECKS
_SOFT = ROW_CHECKS.index("bwd_softmax")


def backward(query, key, value, out, lse, grad_out, *, scale: float, is_causal: bool, me: int, P: int, exchange,
             checked: bool = False, plan=None):
    """``(dQ, dK, dV, checks)`` of this rank's chunks in their dtypes, as
    :func:`.ring_backward.backward` (same arguments; ``lse`` in base e, −inf on a row that
    attends nothing), ``checks`` a :class:`.ring_backward.BackwardChecks` over
    ``ROW_CHECKS``, ``KEY_CHECKS`` and ``GROUP_CHECKS`` (None without ``checked``)."""
    B, N, Tc, H = query.shape
    K, Sc = key.shape[1], key.shape[2]
    dev, f32 = query.device, torch.float32
    launch = fused.launch
    interp = launch.interpreting()
    bs = BackwardBlocks.get_default(interp)
    forward_block_n = fused.BlockSizes.get_default(interp, checks=checked, T=Tc).block_n
    lse2 = torch.where(torch.isfinite(lse), lse.to(f32) * (1.0 / math.log(2.0)), torch.inf)
    live = torch.isfinite(lse2)
    q, o, do = query.detach().contiguous(), out.detach().contiguous(), grad_out.contiguous()
    dq = torch.zeros(B, N, Tc, H, dtype=f32, device=dev)
    kr, vr = key.detach().contiguous(), value.detach().contiguous()
    dk = torch.zeros(B, K, Sc, H, dtype=f32, device=dev)
    dv = torch.zeros_like(dk)
    carried = [torch.zeros(B, K, Sc, dtype=f32, device=dev) for _ in range(4)]
    kworst = torch.zeros(len(KEY_CHECKS), B, K, Sc, dtype=f32, device=dev)
    rows = torch.zeros(len(ROW_CHECKS), B, N, Tc, dtype=f32, device=dev)  # worst ratios (bwd_softmax's: 0)
    judged = torch.ones(len(ROW_CHECKS), 1, 1, 1, dtype=torch.bool, device=dev)
    judged[_SOFT] = False  # a step's bwd_softmax plane holds Σ p, judged after the last step
    psum = torch.zeros(B, N, Tc, dtype=f32, device=dev)
    p_group = torch.zeros(B, K, dtype=f32, device=dev)
    steps = torch.zeros(P, dtype=torch.bool, device=dev)

    for r in range(P):
        j = (me - r) % P  # the rank whose chunk is here
        if checked and r > 0:  # the accumulators as received
            t = _transit(dk, dv, carried, H, P)
            kworst[-1] = _worst(kworst[-1], t)
            steps[r] |= _bad(t).any()
        if not (is_causal and j > me):
            got = launch.backward(q, kr, vr, o, lse2, do, scale=scale,
                                  masks=launch.Masks(is_causal=is_causal and j == me), checks=checked,
                                  plan=faults.core_plan(plan, me, r, spec_faults.BACKWARD_SITES), blocks=bs, forward_block_n=forward_block_n,
                                  partial=True, grad_dtype=f32)
            if checked:  # every check's planes at once: (residual, threshold) pairs along dim 1
                rs = got.row_stats.view(len(ROW_CHECKS), 2, B, N, Tc)
                psum += rs[_SOFT, 0]
                ratio = torch.where(judged, _ratio(rs[:, 0], rs[:, 1]), 0.0)
                rows = _worst(rows, ratio)
                ks = got.key_stats.view(len(KEY_CHECKS) - 1, 2, B, K, Sc)
                kratio = _ratio(ks[:, 0], ks[:, 1])
                kworst[:-1] = _worst(kworst[:-1], kratio)
                steps[r] |= _bad(ratio).any() | _bad(kratio).any()
                p_group += got.blocks.sum(-1).view(B, K)
                carried = _carry(carried, got.dk, got.dv)
            dq += got.dq
            dk += got.dk
            dv += got.dv
        kr, vr, dk, dv, carried, kworst = _send(kr, vr, dk, dv, carried, kworst, plan=plan, me=me, r=r, P=P,
                                                exchange=exchange, checked=checked)
    result = None
    if checked:  # home: the accumulators against their checksums, the softmax's sums over the steps
        t = _transit(dk, dv, carried, H, P)
        kworst[-1] = _worst(kworst[-1], t)
        dtype = str(query.dtype).removeprefix("torch.")
        thr = spec.softmax_threshold(Sc * P, P, H, dtype, bs.block_m, bs.block_n, forward_block_n,
                                     torch.where(live, lse2, 0.0), psum)
        soft = torch.where(live, _ratio(psum - 1.0, thr), _ratio(psum, thr))
        attended = live.view(B, K, -1).sum(-1).to(f32)
        group = _ratio(p_group - attended, spec.group_threshold(
            thr.view(B, K, -1).sum(-1), attended, Tc=Tc, Sc=Sc, P=P, G=N // K, block_m=bs.block_m,
            block_n=bs.block_n))
        steps[P - 1] |= _bad(t).any() | _bad(soft).any() | _bad(group).any()
        ratios = {**dict(zip(ROW_CHECKS, rows)), "bwd_softmax": soft, **dict(zip(KEY_CHECKS, kworst)),
                  "bwd_softmax_kv": group}
        finite = grad_out.isfinite().all()
        result = BackwardChecks({n: ratios[n] for n in (*ROW_CHECKS, *KEY_CHECKS, *GROUP_CHECKS)}, steps, finite)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), result


__all__ = ["backward", "ROW_CHECKS", "KEY_CHECKS", "GROUP_CHECKS"]
