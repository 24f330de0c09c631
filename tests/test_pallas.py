"""``implementation="pallas"``: the portable Pallas kernel against the float64
reference, the unfused ``full`` scheme and the Triton kernel of ``ftattn_torch``.

``TestPallasGPU`` runs the kernel compiled (Pallas' Triton lowering) and is
skipped without a GPU; ``TestPallasInterpret`` subclasses it and runs the same
suite in Pallas' interpret mode, on the CPU in CI. GPU-only tests (the
compiled kernel's PTX) are marked so.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.experimental import checkify  # noqa: E402

import ftattn_jax  # noqa: E402
from ftattn_jax import fused  # noqa: E402
from ftattn_jax.fused import kernel_ir  # noqa: E402
from ftattn_spec import reference as ref  # noqa: E402
from ftattn_spec.faults import Fault, FaultDetected  # noqa: E402
from ftattn_spec.inputs import DISTRIBUTIONS  # noqa: E402

from .fused_cases import CASES, FAULTS, SHAPE  # noqa: E402
from .inputs import exact, make_qkv  # noqa: E402

HAVE_GPU = jax.default_backend() == "gpu"




def _inputs(seed=0, dist="normal", dtype="float16", **shape):
    """``(q, k, v)`` in ``BTNH``/``BSKH`` and their float64 values in the torch layout."""
    arrs = make_qkv(seed, dist, framework="jax", dtype=dtype, shape=SHAPE, **shape)
    return arrs, [exact(x) for x in arrs]


def _check_output(out, exact, dtype, is_causal, slack=1.0):
    o64, p, _ = ref.attention(*exact, is_causal=is_causal)
    bound = ref.output_bound(*exact, p, o64, dtype=dtype, is_causal=is_causal)
    err = np.abs(np.swapaxes(np.asarray(out.astype(jnp.float32), np.float64), 1, 2) - o64)
    assert np.isfinite(err).all()
    worst = (err / bound).max()
    assert worst <= slack, f"output error {worst:.3g} x the bound"


def _ratios(report):
    return {n: float(jnp.max(c.residual / c.threshold)) for n, c in report.checks.items()}


def clean_case(attn, case: dict):
    """Run one of the fused kernels' cases (``dtype``, ``is_causal`` and shape overrides) through
    ``attn``: the output within the float64 bound, the three row checks, nothing flagged.
    Returns ``((q, k, v), exact, dtype, is_causal)``."""
    case = dict(case)
    dtype, causal = case.pop("dtype"), case.pop("is_causal")
    (q, k, v), exact = _inputs(1, "normal", dtype, **case)
    out, report = attn(q, k, v, is_causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check_output(out, exact, dtype, causal)
    assert list(report.checks) == ["qk_row", "softmax_dmr", "pv_row"]
    assert not bool(report.detected) and bool(report.inputs_finite), _ratios(report)
    assert report.located == {} and int(report.corrected) == 0
    B, T, N, _ = q.shape
    for name, c in report.checks.items():
        assert c.residual.shape == (B, N, T) and c.flagged.dtype == jnp.bool_, name
        assert bool(jnp.all(c.threshold > 0)) and bool(jnp.all(jnp.isfinite(c.residual))), name
    return (q, k, v), exact, dtype, causal


def assert_grads_of_plain_attention(attn, q, k, v):
    """``jax.grad`` through ``attn`` (causal) equals that of the unfused path, in the input dtype."""
    w = jnp.linspace(-1, 1, q.shape[-1])
    grads = [jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)[0].astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)
             for fn in (attn, lambda *a: ftattn_jax.attention(*a, is_causal=True))]
    for a, b in zip(*grads):
        assert a.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3, rtol=1e-2)


class TestPallasGPU:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if not (self.INTERPRET or HAVE_GPU):
            pytest.skip("compiles the kernel for a GPU (TestPallasInterpret runs the suite on CPU)")

    def attn(self, q, k, v, **kw):
        return ftattn_jax.attention(q, k, v, implementation="pallas", interpret=self.INTERPRET, **kw)

    @pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
    def test_output_within_bound_and_clean_run_not_flagged(self, case):
        clean_case(self.attn, case)

    @pytest.mark.parametrize("dist", DISTRIBUTIONS)
    def test_clean_runs_never_flagged(self, dist):
        for seed in range(2):
            for causal in (False, True):
                (q, k, v), exact = _inputs(10 + seed, dist, "bfloat16" if seed else "float16")
                out, report = self.attn(q, k, v, is_causal=causal)
                assert not bool(report.detected), (dist, seed, causal, _ratios(report))
                _check_output(out, exact, "bfloat16" if seed else "float16", causal)

    def test_matches_unfused_full(self):
        (q, k, v), exact = _inputs(3, "uniform", "float16")
        for causal in (False, True):
            a, ra = self.attn(q, k, v, is_causal=causal)
            b, rb = ftattn_jax.attention(q, k, v, is_causal=causal)
            o64, p, _ = ref.attention(*exact, is_causal=causal)
            bound = ref.output_bound(*exact, p, o64, dtype="float16", is_causal=causal)
            diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
            assert (np.swapaxes(diff, 1, 2) <= 2 * bound).all()
            for name in ra.checks:  # the same quantity: thresholds of the same order
                assert float(jnp.max(ra.checks[name].threshold / rb.checks[name].threshold)) < 8.0, name
            assert not bool(ra.detected) and not bool(rb.detected)

    @pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f"{f.site}{f.replica}-{f.bit}-{f.value}")
    @pytest.mark.parametrize("causal", [False, True])
    def test_verdicts_agree_with_unfused(self, fault, causal):
        (q, k, v), _ = _inputs(5, "normal", "float16")
        _, rf = self.attn(q, k, v, is_causal=causal, fault=fault)
        _, ru = ftattn_jax.attention(q, k, v, is_causal=causal, fault=fault)
        b, n, i = fault.index[:3]
        masked = causal and fault.site in ("scores", "probs") and fault.index[3] > i
        assert bool(rf.detected) == bool(ru.detected) == (not masked)
        for name in rf.checks:
            assert (np.asarray(rf.checks[name].flagged) == np.asarray(ru.checks[name].flagged)).all(), name
        if not masked:
            hit = [name for name, c in rf.checks.items() if bool(c.flagged[b, n, i])]
            assert hit, "the faulty row is flagged"
            assert sum(int(c.flagged.sum()) for c in rf.checks.values()) == len(hit), "only the faulty row is"

    def test_one_compilation_serves_every_fault(self):
        (q, k, v), _ = _inputs(5, "normal", "float16")
        for f in FAULTS[:3]:
            self.attn(q, k, v, fault=f)
        before = fused.runner._run._cache_size()
        for f in FAULTS[3:]:
            _, r = self.attn(q, k, v, fault=f)
            assert bool(r.detected)
        assert fused.runner._run._cache_size() == before

    def test_input_faults_and_low_bits(self):
        (q, k, v), _ = _inputs(6, "normal", "float16")
        for f in (Fault("scores", (0, 0, 3, 3), bit=0), Fault("out", (1, 2, 7, 1), bit=1)):
            _, rf = self.attn(q, k, v, fault=f)
            _, ru = ftattn_jax.attention(q, k, v, fault=f)
            assert not bool(rf.detected) and not bool(ru.detected)
        f = Fault("key", (1, 0, 11, 3), bit=14)  # float16 exponent bit of one key
        _, rf = self.attn(q, k, v, fault=f)
        _, ru = ftattn_jax.attention(q, k, v, fault=f)
        assert bool(rf.inputs_finite) and bool(ru.inputs_finite)
        assert not bool(rf.detected) and not bool(ru.detected)  # an input fault is not a compute fault

    @pytest.mark.parametrize("fault", FAULTS[:1] + FAULTS[2:5], ids=lambda f: f.site)
    def test_correct_recomputes_the_flagged_rows(self, fault):
        (q, k, v), exact = _inputs(7, "normal", "float16")
        clean, _ = self.attn(q, k, v)
        out, report = self.attn(q, k, v, fault=fault, on_fault="correct")
        assert bool(report.detected) and int(report.corrected) >= 1
        assert bool(jnp.all(out == clean))
        _check_output(out, exact, "float16", False)

    def test_nan_and_raise_policies(self):
        (q, k, v), _ = _inputs(8, "normal", "float16")
        f = Fault("out", (1, 2, 9, 3), bit=30)
        out, _ = self.attn(q, k, v, fault=f, on_fault="nan")
        bad = np.isnan(np.asarray(out, np.float32)).any(-1)  # B T N
        assert bad[1, 9, 2] and bad.sum() == 1
        with pytest.raises(FaultDetected) as e:
            self.attn(q, k, v, fault=f, on_fault="raise")
        assert bool(e.value.report.detected)
        run = checkify.checkify(jax.jit(lambda q, k, v: self.attn(q, k, v, fault=f, on_fault="raise")[0]))
        err, _ = run(q, k, v)
        with pytest.raises(checkify.JaxRuntimeError):
            err.throw()

    def test_global_granularity(self):
        (q, k, v), _ = _inputs(9, "normal", "float16")
        _, clean = self.attn(q, k, v, granularity="global")
        assert not bool(clean.detected) and clean.checks["pv_row"].residual.shape == (SHAPE["B"], SHAPE["N"])
        _, rep = self.attn(q, k, v, granularity="global", fault=Fault("scores", (1, 3, 30, 4), bit=30))
        assert bool(rep.checks["qk_row"].flagged[1, 3]) and int(rep.checks["qk_row"].flagged.sum()) == 1

    def test_schemes_run_their_row_checks(self):
        (q, k, v), _ = _inputs(2, "normal", "float16")
        for scheme, expect in (("baseline", []), ("dmr_softmax", ["softmax_dmr"]), ("abft_qk_row", ["qk_row"]),
                               ("abft_pv_row", ["pv_row"])):
            out, rep = self.attn(q, k, v, scheme=scheme)
            assert list(rep.checks) == expect and not bool(rep.detected) and bool(rep.inputs_finite)
        with pytest.raises(ValueError, match="abft_qk_col"):
            self.attn(q, k, v, scheme="abft_qk_col")

    def test_nonfinite_input_fails_closed_and_is_named(self):
        (q, k, v), _ = _inputs(4, "normal", "float16")
        for arrs in ((q, k.at[1, 3, 0, 2].set(jnp.nan), v), (q.at[0, 5, 1, 0].set(jnp.inf), k, v)):
            _, rep = self.attn(*arrs)
            assert not bool(rep.inputs_finite) and bool(rep.detected)
            _, rep = self.attn(*arrs, scheme="baseline")
            assert not bool(rep.inputs_finite)

    def test_huge_finite_inputs_are_finite(self):
        """``inputs_finite`` reads the checks' float32 sums of |k| and |v| when they are finite; sums that
        overflow on finite bfloat16 inputs (near 3e38) fall back to a pass over the inputs."""
        (q, k, v), _ = _inputs(16, "normal", "bfloat16")
        k = k.at[0, 3:6, 1, :].set(3e38)
        v = v.at[1, 7:9, 0, :].set(-3e38)
        _, rep = self.attn(q, k, v)
        assert bool(rep.inputs_finite)
        _, rep = self.attn(q, k.at[0, 3, 1, 0].set(jnp.inf), v)
        assert not bool(rep.inputs_finite)

    def test_jit_vmap_and_grad(self):
        (q, k, v), _ = _inputs(11, "normal", "float16", T=20, S=24)
        f = jax.jit(lambda q, k, v: self.attn(q, k, v, is_causal=True))
        out, rep = f(q, k, v)
        ref_out, _ = self.attn(q, k, v, is_causal=True)
        assert bool(jnp.all(out == ref_out)) and not bool(rep.detected)
        # vmap over an extra leading axis: each slice as its own call
        stack = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]
        vo, vr = jax.vmap(lambda q, k, v: self.attn(q, k, v, is_causal=True))(*stack)
        assert vo.shape == (2, *q.shape) and vr.checks["qk_row"].flagged.shape == (2, SHAPE["B"], SHAPE["N"], 20)
        assert bool(jnp.all(vo[0] == out)) and not bool(vr.detected.any())
        # gradients: those of plain attention (the unfused path's)
        assert_grads_of_plain_attention(lambda *a: self.attn(*a, is_causal=True), q, k, v)

    def test_dropin_takes_the_kernel(self):
        (q, k, v), exact = _inputs(12, "normal", "float16")
        out, rep = ftattn_jax.dot_product_attention(q, k, v, is_causal=True, implementation="pallas",
                                                    return_report=True)
        assert list(rep.checks) == ["qk_row", "softmax_dmr", "pv_row"] and not bool(rep.detected)
        _check_output(out, exact, "float16", True)

    def test_unsupported_inputs_raise_naming_the_limit(self):
        (q, k, v), _ = _inputs(0, "normal", "float16")
        with pytest.raises(TypeError, match="float16 or bfloat16"):
            self.attn(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
        with pytest.raises(ValueError, match="head dim"):
            self.attn(q[..., :12], k[..., :12], v[..., :12])
        with pytest.raises(TypeError, match="mask"):
            self.attn(q, k, v, mask=jnp.ones((37, 45), jnp.float32))
        with pytest.raises(ValueError, match="local_window_size"):
            self.attn(q, k, v, local_window_size=-4)
        with pytest.raises(TypeError, match="interpret"):
            self.attn(q, k, v, interpret="yes") if self.INTERPRET else ftattn_jax.attention(
                q, k, v, implementation="pallas", interpret=1)
        with pytest.raises(ValueError, match="interpret"):
            ftattn_jax.attention(q, k, v, interpret=True)
        with pytest.raises(ValueError, match="block_m"):
            fused.run(q, k, v, checks=("qk_row",), granularity="vector", scale=0.25, is_causal=False,
                      interpret=True, blocks=fused.BlockSizes(24, 16))

class TestPallasInterpret(TestPallasGPU):
    """The same suite in Pallas' interpret mode (CPU in CI)."""

    INTERPRET = True


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_cpu_default_interprets():
    """Without a GPU, ``implementation="pallas"`` runs in interpret mode by itself;
    ``interpret=False`` (compile) is an error that says what to do."""
    if HAVE_GPU:
        pytest.skip("needs a machine without a GPU")
    (q, k, v), exact = _inputs(13, "normal", "float16")
    out, rep = ftattn_jax.attention(q, k, v, implementation="pallas")
    assert not bool(rep.detected)
    _check_output(out, exact, "float16", False)
    with pytest.raises(ValueError, match="interpret"):
        ftattn_jax.attention(q, k, v, implementation="pallas", interpret=False)


@pytest.mark.slow
def test_verdicts_agree_with_the_triton_kernel():
    """Both backends' fused kernels, on identical inputs and fault plans, flag the same rows."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import ftattn_torch

    from ftattn_torch import fused as torch_fused

    dev = os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu")
    if dev != "cuda" and not torch_fused.interpreting():
        pytest.skip("the Triton kernel needs FTATTN_TEST_TORCH_DEVICE=cuda or TRITON_INTERPRET=1")
    if dev != "cuda" and tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip(f"Triton 3.6's interpreter fails on numpy {np.__version__} (>= 2.4); "
                    "run with FTATTN_TEST_TORCH_DEVICE=cuda")
    (q, k, v), _ = _inputs(14, "normal", "float16")
    tq, tk, tv = (torch.from_numpy(np.swapaxes(np.asarray(x, np.float32), 1, 2).copy()).half().to(dev)
                  for x in (q, k, v))
    for causal in (False, True):
        for f in FAULTS:
            _, rj = ftattn_jax.attention(q, k, v, implementation="pallas", is_causal=causal, fault=f)
            _, rt = ftattn_torch.attention(tq, tk, tv, implementation="triton", is_causal=causal, fault=f)
            assert bool(rj.detected) == bool(rt.detected), (f, causal)
            for name in rj.checks:
                assert (np.asarray(rj.checks[name].flagged) == rt.checks[name].flagged.cpu().numpy()).all(), name


def _strip_locations(ttir: str) -> str:
    """Pallas prints its Triton IR with pretty locations, which Triton's parser rejects: keep the
    module alone (location aliases are printed around it, some over several lines) and drop the
    inline location references."""
    lines = ttir.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("module"))
    end = next(i for i in range(start + 1, len(lines)) if re.match(r"\}(\s|$)", lines[i]))
    kept = []
    for line in lines[start:end + 1]:
        line = re.sub(r'\s+"[^"]*"\(#loc\d*\)', "", line)
        line = re.sub(r"\s+\[unknown\]", "", line)
        kept.append(re.sub(r"\s+#loc\d*\b", "", line))
    return "\n".join(kept) + "\n"


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_replica_survives_compilation(tmp_path, causal):
    """The checked kernel evaluates every exponential twice, after compilation.

    The Triton IR that Pallas emits for the kernel (lowered for CUDA, which
    works on any machine) is compiled by Triton to PTX for sm_90; the PTX of
    ``full`` must hold at least twice the ``ex2.approx`` instructions of the
    kernel with the checks compiled out. A replica merged by CSE (Triton's
    passes, LLVM) or dropped as dead code fails this. The compiler is the
    installed ``triton`` package, not the Triton inside XLA (whose PTX XLA
    does not dump); both are built from the same passes.
    """
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    counts = {}
    for scheme in ("full", "baseline"):
        ttir = kernel_ir.triton_ir((1, 256, 2, 64), (1, 256, 2, 64), "float16", scheme=scheme, is_causal=causal,
                               blocks=fused.BlockSizes(128, 64, 4, 2))
        path = tmp_path / f"{scheme}.ttir"
        path.write_text(_strip_locations(ttir))
        ptx = triton.compile(str(path), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        counts[scheme] = (len(re.findall(r"__nv_exp2f", ttir)), len(re.findall(r"\bex2\.approx", ptx)))
    (ir_full, ptx_full), (ir_base, ptx_base) = counts["full"], counts["baseline"]
    assert ir_full == 2 * ir_base, counts  # the kernel as written: one replica per exponential
    assert ptx_base > 0 and ptx_full >= 2 * ptx_base - 4, counts


def test_checked_backward_kernels_compile_for_sm90(tmp_path):
    """The fused backward's two kernels (``ftattn_jax/fused/pallas_backward.py``), checks on, go
    through Pallas' Triton lowering for CUDA and Triton's compiler to sm_90 code on any machine,
    within the H200's shared memory (228 KB per block)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    irs = kernel_ir.backward_triton_ir((1, 256, 4, 64), (1, 192, 2, 64), "bfloat16", checks=True)
    for name, ttir in irs.items():
        path = tmp_path / f"{name}.ttir"
        path.write_text(_strip_locations(ttir))
        compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        assert "ptx" in compiled.asm and 0 < compiled.metadata.shared <= 228 * 1024, name
