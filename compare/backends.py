"""Thin adapters that give both backends one interface for tests and tools.

Arrays cross the boundary in the logical layout ``BNTH`` / ``BKSH`` as float64
NumPy; each adapter converts to its backend's layout, dtype and device. A
backend's framework is imported only when its adapter is created.
"""

from __future__ import annotations

import os

import numpy as np

from ftattn_spec import implementations as catalogue
from ftattn_spec.report import CheckResult, Report


class JaxBackend:
    name = "jax"

    def __init__(self, implementation: str = "unfused"):
        import jax
        import jax.numpy as jnp

        import ftattn_jax

        self.jax, self.jnp, self.mod = jax, jnp, ftattn_jax
        #: what :meth:`attention` passes as ``implementation=`` unless the call names one
        self.implementation = implementation

    def array(self, x: np.ndarray, dtype: str):
        """Logical BNTH/BKSH numpy → backend layout BTNH/BSKH in ``dtype``.

        Values go through float32 first in both adapters, so that both
        backends round them to ``dtype`` identically (a float64 → float16 cast
        rounds once in PyTorch and twice, through float32, in JAX).
        """
        x32 = np.ascontiguousarray(x.transpose(0, 2, 1, 3), dtype=np.float32)
        return self.jnp.asarray(x32).astype(dtype)

    def logical(self, a) -> np.ndarray:
        return np.asarray(a.astype(self.jnp.float32), dtype=np.float64).transpose(0, 2, 1, 3)

    def attention(self, q, k, v, **kw):
        """``ftattn_jax.attention``; NumPy mask arguments (logical BNTS) are converted.
        ``implementation=`` defaults to the adapter's, always passed (the library's default,
        ``"auto"``, would take the fused kernel on a GPU; ``"pallas"`` interprets the kernel
        unless JAX's default backend is a GPU)."""
        kw = {n: (self.jnp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
        kw.setdefault("implementation", self.implementation)
        return self.mod.attention(q, k, v, **kw)

    def lowering(self, q, scheme: str = "full") -> str | None:
        """Which Pallas kernel ``implementation="pallas"`` runs for ``q`` and ``scheme`` here
        (``"mosaic_gpu"``, the Hopper kernel, or ``"triton"``, the portable one), so a result says
        which was timed."""
        from ftattn_jax import fused
        from ftattn_spec.implementations import checks_for

        return fused.select_lowering(q, checks=checks_for("jax", "pallas", scheme))

    def jitted(self, **kw):
        """:meth:`attention` with these keyword arguments (static: strings, bools, None), under
        ``jax.jit``, as a user calls it and as the ``jax.nn`` peers are timed; one compiled
        function per set of arguments."""
        cache = self.__dict__.setdefault("_jitted", {})
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = self.jax.jit(lambda q, k, v: self.attention(q, k, v, **kw))
        return cache[key]

    def sync(self, tree):
        return self.jax.block_until_ready(tree)

    def numpy_report(self, report: Report) -> Report:
        return self.jax.tree.map(np.asarray, report)

    def row_scales(self, q, k, out, *, is_causal: bool) -> dict[str, np.ndarray]:
        """Largest |element| of each checked row or column: S rows, S columns, P rows, O rows, O columns."""
        jnp = self.jnp
        B, T, N, H = q.shape
        S, K = k.shape[1], k.shape[2]
        qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
        s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32), precision="highest")
        s = s.reshape(B, N, T, S) * H**-0.5
        if is_causal:
            mask = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
            p = self.jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
            s = jnp.where(mask, s, 0.0)
        else:
            p = self.jax.nn.softmax(s, axis=-1)
        return {
            "qk_row": np.asarray(jnp.abs(s).max(-1)),
            "qk_col": np.asarray(jnp.abs(s).max(-2)),
            "softmax_dmr": np.asarray(p.max(-1)),
            "pv_row": np.asarray(jnp.abs(out.astype(jnp.float32)).max(-1).transpose(0, 2, 1)),
            "pv_col": np.asarray(jnp.abs(out.astype(jnp.float32)).max(1).transpose(0, 2, 1)),
        }

    def environment(self) -> dict[str, str]:
        import jaxlib

        dev = self.jax.devices()[0]
        env = {"jax": self.jax.__version__, "jaxlib": jaxlib.__version__, "device": dev.device_kind}
        if self.implementation != "unfused":
            env["implementation"] = self.implementation
        if self.implementation == "pallas":  # Pallas ships with jax: its version is env["jax"]
            env["pallas_interpret"] = "1" if self.interpreted() else ""  # like triton_interpret
        return env

    def interpreted(self) -> bool:
        """Whether ``implementation="pallas"`` runs in Pallas' interpret mode here (no GPU)."""
        return self.jax.default_backend() != "gpu"


class TorchBackend:
    name = "torch"

    def __init__(self, device: str | None = None, implementation: str = "unfused"):
        import torch

        import ftattn_torch

        self.torch, self.mod = torch, ftattn_torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        #: what :meth:`attention` passes as ``implementation=`` unless the call names one
        self.implementation = implementation

    def array(self, x: np.ndarray, dtype: str):
        t = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        return t.to(getattr(self.torch, dtype))

    def logical(self, a) -> np.ndarray:
        return a.detach().to(self.torch.float64).cpu().numpy()

    def attention(self, q, k, v, **kw):
        """``ftattn_torch.attention``; NumPy mask arguments (logical BNTS) are converted.
        ``implementation=`` defaults to the adapter's, always passed (the library's default,
        ``"auto"``, would take the fused kernel on a GPU)."""
        kw = {n: (self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device) if isinstance(x, np.ndarray) else x)
              for n, x in kw.items()}
        kw.setdefault("implementation", self.implementation)
        if self.implementation == "unfused":
            return self.mod.attention(q, k, v, **kw)
        with np.errstate(all="ignore"):  # Triton's interpreter (NumPy) warns where a GPU makes inf or NaN silently
            return self.mod.attention(q, k, v, **kw)

    def sync(self, tree):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        return tree

    def numpy_report(self, report: Report) -> Report:
        conv = lambda t: t.detach().cpu().numpy()  # noqa: E731
        return Report(conv(report.detected),
                      {n: CheckResult(*(conv(x) for x in c)) for n, c in report.checks.items()},
                      conv(report.inputs_finite), {n: conv(x) for n, x in report.located.items()},
                      conv(report.corrected))

    def row_scales(self, q, k, out, *, is_causal: bool) -> dict[str, np.ndarray]:
        torch = self.torch
        B, N, T, H = q.shape
        K, S = k.shape[1], k.shape[2]
        kk = k.float().repeat_interleave(N // K, dim=1)
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            s = torch.matmul(q.float(), kk.transpose(-1, -2)) * H**-0.5
        finally:
            torch.set_float32_matmul_precision(prev)
        if is_causal:
            mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None]
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
            s = s.masked_fill(~mask, 0.0)
        else:
            p = torch.softmax(s, -1)
        conv = lambda t: t.cpu().numpy()  # noqa: E731
        return {"qk_row": conv(s.abs().amax(-1)), "qk_col": conv(s.abs().amax(-2)),
                "softmax_dmr": conv(p.amax(-1)), "pv_row": conv(out.float().abs().amax(-1)),
                "pv_col": conv(out.float().abs().amax(-2))}

    def environment(self) -> dict[str, str]:
        torch = self.torch
        env = {"torch": torch.__version__, "device": str(self.device)}
        if self.implementation != "unfused":
            env["implementation"] = self.implementation
        if self.implementation == "triton":
            import triton  # already imported by the calls, compiled or interpreted

            env["triton"] = triton.__version__
            env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
        if self.device.type == "cuda":
            env["device"] = torch.cuda.get_device_name(self.device)
            env["cuda"] = str(torch.version.cuda)
        return env


#: The implementations ``make_backend`` can give each backend (the first is the default).
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {b: tuple(i.name for i in catalogue.implementations(b))
                                              for b in catalogue.BACKENDS}


def make_backend(name: str, implementation: str = "unfused"):
    """The adapter of backend ``name``, calling ``implementation`` (jax: ``"unfused"`` or ``"pallas"``;
    torch: ``"unfused"`` or ``"triton"``)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"backend: expected 'jax' or 'torch', got {name!r}")
    if implementation not in IMPLEMENTATIONS[name]:
        raise ValueError(f"implementation: backend {name!r} offers {IMPLEMENTATIONS[name]}, got {implementation!r}")
    if name == "jax":
        return JaxBackend(implementation=implementation)
    return TorchBackend(implementation=implementation)
