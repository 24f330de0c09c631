"""Float64 gradients of plain attention (PyTorch autograd on the reference formula),
the oracle of the gradient tests of both backends."""

from __future__ import annotations

import numpy as np

from ftattn_spec import masking


def reference_grads(q, k, v, w, *, scale=None, is_causal=False, mask=None, bias=None, window=None,
                    query_lengths=None, key_lengths=None, empty="zero"):
    """Gradients of ``Σ out·w`` w.r.t. (q, k, v, bias) in float64; logical layout
    (q and ``w`` ``BNTH``, k and v ``BKSH``, bias broadcastable to ``BNTS``)."""
    import torch

    B, N, T, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    scale = H**-0.5 if scale is None else scale
    t = lambda x: torch.tensor(np.asarray(x, np.float64), requires_grad=True)  # noqa: E731
    qt, kt, vt = t(q), t(k), t(v)
    bt = None if bias is None else t(bias)
    a = torch.from_numpy(masking.allowed(B, N, T, S, mask=mask, is_causal=is_causal, window=window,
                                         query_lengths=query_lengths, key_lengths=key_lengths))
    s = qt @ kt.repeat_interleave(G, 1).transpose(-1, -2) * scale
    if bt is not None:
        s = s + bt.reshape((1,) * (4 - bt.ndim) + tuple(bt.shape))
    s = s.masked_fill(~a, -torch.inf)
    m = s.amax(-1, keepdim=True)
    z = (s - m.masked_fill(m == -torch.inf, 0.0)).exp()
    d = z.sum(-1, keepdim=True)
    p = z / torch.where(d > 0, d, torch.ones_like(d))
    if empty == "uniform":
        live = torch.from_numpy(masking.live_rows(B, T, query_lengths))
        p = torch.where(live & ~a.any(-1, keepdim=True), torch.full_like(p, 1.0 / S), p)
    out = p @ vt.repeat_interleave(G, 1)
    (out * torch.from_numpy(np.asarray(w, np.float64))).sum().backward()
    grads = [x.grad.numpy() for x in (qt, kt, vt)]
    return grads + ([bt.grad.numpy()] if bt is not None else [])


def assert_grads_close(got, want, rtol=2e-4, name=""):
    """Each gradient within ``rtol`` of the largest reference entry (float32 backward)."""
    for i, (g, r) in enumerate(zip(got, want)):
        g = np.asarray(g, np.float64)
        assert g.shape == r.shape, (name, i, g.shape, r.shape)
        scale = max(np.abs(r).max(), 1e-30)
        err = np.abs(g - r).max()
        assert err <= rtol * scale, f"{name} grad {i}: max error {err:.3g} > {rtol} x {scale:.3g}"
