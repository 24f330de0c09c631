"""The Hopper kernel of ``implementation="pallas"`` (Mosaic GPU, ``lowering="mosaic_gpu"``).

It compiles for sm_90 only and has no interpret mode, so ``TestMosaicGPU``
runs on a Hopper GPU and is skipped elsewhere with the reason. Its outputs
and verdicts are held to the float64 bound, to the portable kernel and to the
unfused ``full`` scheme. The tests that need no GPU (selection, errors, that
the kernel lowers for CUDA on any machine) run everywhere.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import ftattn_jax  # noqa: E402
from ftattn_jax import fused  # noqa: E402
from ftattn_jax.fused import kernel_ir  # noqa: E402
from ftattn_jax.fused import mosaic_kernel  # noqa: E402
from ftattn_spec.faults import Fault, plan  # noqa: E402
from ftattn_spec.inputs import DISTRIBUTIONS  # noqa: E402

from .fused_cases import FAULTS  # noqa: E402
from .test_pallas import _check_output, _inputs, _ratios, assert_grads_of_plain_attention, clean_case  # noqa: E402,E501

HOPPER = mosaic_kernel.available()

# every axis a different size; T, S not multiples of the 128-row programs or the 128-key tiles
MOSAIC_CASES = [
    dict(dtype="float16", is_causal=False, H=64, T=200, S=300),
    dict(dtype="float16", is_causal=True, H=64, T=200, S=300),
    dict(dtype="bfloat16", is_causal=False, H=128, T=300, S=200),
    dict(dtype="bfloat16", is_causal=True, H=128, T=300, S=200),  # T > S
    dict(dtype="float16", is_causal=True, H=128, T=256, S=256, N=6, K=2),
    dict(dtype="float16", is_causal=False, H=64, T=5, S=70, K=1),
    dict(dtype="float16", is_causal=False, H=128, T=130, S=1000, B=1, N=2, K=1),
]


@pytest.mark.skipif(not HOPPER, reason="the Hopper kernel compiles for sm_90 only (no interpret mode); "
                    "this machine has no Hopper GPU")
class TestMosaicGPU:
    def attn(self, q, k, v, **kw):
        return ftattn_jax.attention(q, k, v, implementation="pallas", lowering="mosaic_gpu", **kw)

    @pytest.mark.parametrize("case", MOSAIC_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
    def test_output_within_bound_and_clean_run_not_flagged(self, case):
        (q, k, v), exact, dtype, causal = clean_case(self.attn, case)
        base, rep = self.attn(q, k, v, is_causal=causal, scheme="baseline")
        assert rep.checks == {} and bool(rep.inputs_finite)
        _check_output(base, exact, dtype, causal)

    @pytest.mark.parametrize("dist", DISTRIBUTIONS)
    def test_clean_runs_never_flagged(self, dist):
        for seed, causal in itertools.product(range(2), (False, True)):
            dtype = "bfloat16" if seed else "float16"
            (q, k, v), exact = _inputs(10 + seed, dist, dtype, H=128, T=384, S=520)
            out, report = self.attn(q, k, v, is_causal=causal)
            assert not bool(report.detected), (dist, seed, causal, _ratios(report))
            _check_output(out, exact, dtype, causal)

    def test_large_logits_many_tiles_not_flagged(self):
        """Logits of standard deviation 64 over 4096 keys: before the replica's rescale factor
        was held at 1 where the maximum does not rise, the rounding of m_sc + 1 stayed in it at
        every tile (softmax_dmr ratio 2.4 on the H200; docs/kernels.md, "softmax_dmr at large logits")."""
        ks = jax.random.split(jax.random.key(7), 3)
        q, k, v = ((8.0 * jax.random.normal(x, (1, 4096, 4, 128))).astype(jnp.bfloat16) for x in ks)
        _, rep = self.attn(q, k, v)
        assert not bool(rep.detected), _ratios(rep)

    def test_matches_the_portable_kernel_and_unfused(self):
        (q, k, v), exact = _inputs(3, "uniform", "float16", H=64, T=200, S=300)
        for causal in (False, True):
            a, ra = self.attn(q, k, v, is_causal=causal)
            b, rb = ftattn_jax.attention(q, k, v, is_causal=causal, implementation="pallas", lowering="triton")
            c, rc = ftattn_jax.attention(q, k, v, is_causal=causal)
            for other, rep in ((b, rb), (c, rc)):
                diff = np.abs(np.asarray(a, np.float32) - np.asarray(other, np.float32))
                assert diff.max() < 4e-3, diff.max()
            for name in ra.checks:  # the same quantity, the same tolerance model
                ratio = np.asarray(ra.checks[name].threshold / rb.checks[name].threshold)
                if causal and name == "qk_row":  # the diagonal block's magnitude counts its 64 keys whole
                    row = np.arange(ratio.shape[-1])
                    ratio = ratio * (row + 1) / (row + 64)
                assert 0.1 < ratio.min() and ratio.max() < 10.0, (name, ratio.min(), ratio.max())

    @pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f"{f.site}{f.replica}-{f.bit}-{f.value}")
    @pytest.mark.parametrize("causal", [False, True])
    def test_verdicts_agree_with_the_portable_kernel(self, fault, causal):
        if not fused.mosaic_can_inject():
            pytest.skip("fault injection in the Hopper kernel needs jax >= 0.11 (bitcast in Mosaic GPU)")
        (q, k, v), _ = _inputs(5, "normal", "float16", H=64)
        _, rm = self.attn(q, k, v, is_causal=causal, fault=fault)
        _, rp = ftattn_jax.attention(q, k, v, is_causal=causal, fault=fault, implementation="pallas",
                                     lowering="triton")
        assert bool(rm.detected) == bool(rp.detected)
        for name in rm.checks:
            assert (np.asarray(rm.checks[name].flagged) == np.asarray(rp.checks[name].flagged)).all(), name
        clean, _ = self.attn(q, k, v, is_causal=causal)
        fixed, rc = self.attn(q, k, v, is_causal=causal, fault=fault, on_fault="correct")
        assert bool(jnp.all(fixed == clean)) and int(rc.corrected) == int(rm.detected) * int(rc.corrected)

    @pytest.mark.parametrize("causal", [False, True])
    @pytest.mark.parametrize("variant", [dict(late_checks=True), dict(ping_pong=False), dict(block_kv=64, stages=3),
                                         dict(fma_cols=48), dict(fma_cols=128), dict(overlap=True),
                                         dict(overlap=True, ping_pong=False)],
                             ids=["late", "no-ping-pong", "kv64", "fma48", "fma128", "overlap", "overlap-alone"])
    def test_kernel_variants_give_the_same_verdicts(self, causal, variant):
        """``MosaicBlocks`` variants: the checks beside the P·V MMA, no turns on the tensor cores, 64-key tiles."""
        (q, k, v), exact = _inputs(15, "normal", "bfloat16", H=128, T=300, S=520)
        kw = dict(checks=("qk_row", "softmax_dmr", "pv_row"), granularity="vector", scale=128 ** -0.5, is_causal=causal,
                  lowering="mosaic_gpu")
        a, ra = fused.run(q, k, v, blocks=fused.MosaicBlocks(), **kw)
        b, rb = fused.run(q, k, v, blocks=fused.MosaicBlocks(**variant), **kw)
        _check_output(b, exact, "bfloat16", causal)
        if "block_kv" in variant:
            assert not bool(rb.detected)
            return
        assert bool(jnp.all(a == b)) and not bool(rb.detected)
        for name in ra.checks:
            if name == "softmax_dmr" and variant.get("fma_cols"):
                continue  # another replica arithmetic: other rounding, under the same threshold (not detected)
            np.testing.assert_allclose(np.asarray(ra.checks[name].residual), np.asarray(rb.checks[name].residual),
                                       rtol=1e-5, atol=1e-6 * float(jnp.max(ra.checks[name].threshold)))
        f = plan([Fault("probs", (1, 2, 33, 20), bit=29, replica=1)])
        _, rf = fused.run(q, k, v, blocks=fused.MosaicBlocks(**variant), plan=f, **kw) if fused.mosaic_can_inject() \
            else (None, None)
        if rf is not None:
            assert bool(rf.checks["softmax_dmr"].flagged[1, 2, 33]) and int(rf.checks["softmax_dmr"].flagged.sum()) == 1

    @pytest.mark.parametrize("scheme", ["abft_softmax", "abft_all"])
    def test_softmax_exp_clean_margin_and_faults_as_the_portable_kernel(self, scheme):
        """``softmax_exp`` in the Hopper kernel (jax >= 0.11): clean runs at every distribution stay
        below half the threshold (H200: the tile ratio at most 0.069; with the row sum l against
        P̂·1, at most 0.40, docs/kernels.md), and a fault at P is flagged at the rows the portable
        kernel flags."""
        if not fused.mosaic_can_inject():
            pytest.skip("softmax_exp in the Hopper kernel needs jax >= 0.11 (bitcast in Mosaic GPU)")
        for dist, causal in itertools.product(DISTRIBUTIONS, (False, True)):
            (q, k, v), exact = _inputs(20, dist, "bfloat16", H=128, T=300, S=520)
            out, rep = self.attn(q, k, v, is_causal=causal, scheme=scheme)
            assert not bool(rep.detected) and max(_ratios(rep).values()) < 0.5, (dist, causal, _ratios(rep))
            _check_output(out, exact, "bfloat16", causal)
        (q, k, v), _ = _inputs(21, "normal", "float16", H=64, T=200, S=300)
        for bit, causal in itertools.product((30, 25, 22), (False, True)):
            fault = Fault("probs", (1, 2, 150, 40), bit=bit)
            _, rm = self.attn(q, k, v, is_causal=causal, scheme=scheme, fault=fault)
            _, rp = ftattn_jax.attention(q, k, v, is_causal=causal, scheme=scheme, fault=fault,
                                         implementation="pallas", lowering="triton")
            a, b = (np.asarray(r.checks["softmax_exp"].flagged) for r in (rm, rp))
            assert (a == b).all() and bool(a[1, 2, 150]), (bit, causal)

    def test_schemes_and_nonfinite_inputs(self):
        (q, k, v), _ = _inputs(2, "normal", "float16", H=64)
        for scheme, expect in (("baseline", []), ("dmr_softmax", ["softmax_dmr"]), ("abft_qk_row", ["qk_row"]),
                               ("abft_pv_row", ["pv_row"])):
            _, rep = self.attn(q, k, v, scheme=scheme)
            assert list(rep.checks) == expect and not bool(rep.detected) and bool(rep.inputs_finite)
        for arrs in ((q, k.at[1, 3, 0, 2].set(jnp.nan), v), (q.at[0, 5, 1, 0].set(jnp.inf), k, v),
                     (q, k, v.at[0, 7, 1, 3].set(-jnp.inf))):
            _, rep = self.attn(*arrs)
            assert not bool(rep.inputs_finite) and bool(rep.detected)
            _, rep = self.attn(*arrs, scheme="baseline")
            assert not bool(rep.inputs_finite)

    def test_jit_vmap_grad_and_auto_selection(self):
        (q, k, v), _ = _inputs(11, "normal", "float16", H=64, T=150, S=170)
        assert fused.select_lowering(q) == "mosaic_gpu"
        one = plan([Fault("scores", (0, 1, 2, 3), bit=30), Fault("scores", (0, 1, 3, 3), bit=30)])
        two = plan([Fault("scores", (0, 1, 2, 3), bit=30), Fault("scores", (0, 1, 2, 4), bit=30)])
        assert fused.select_lowering(q, plan=one) == ("mosaic_gpu" if fused.mosaic_can_inject() else "triton")
        assert fused.select_lowering(q, plan=two) == "triton"
        out, rep = jax.jit(lambda q, k, v: self.attn(q, k, v, is_causal=True))(q, k, v)
        auto, _ = ftattn_jax.attention(q, k, v, implementation="pallas", is_causal=True)
        assert bool(jnp.all(out == auto)) and not bool(rep.detected)
        stack = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]
        vo, vr = jax.vmap(lambda q, k, v: self.attn(q, k, v, is_causal=True))(*stack)
        assert bool(jnp.all(vo[0] == out)) and not bool(vr.detected.any())
        assert_grads_of_plain_attention(lambda *a: self.attn(*a, is_causal=True), q, k, v)

    def test_checks_see_a_corrupted_prediction(self):
        """The kernel's residuals respond to their predictions: a wrong side input is flagged
        (checks the wiring; the fault campaign checks detection of real faults)."""
        (q, k, v), _ = _inputs(4, "normal", "float16", H=128, T=256, S=256)
        cfg = fused.config(q.shape, k.shape, "float16", scale=128 ** -0.5, causal=False,
                           which=("qk_row", "softmax_dmr", "pv_row"), n_faults=0, blocks=fused.MosaicBlocks(),
                           interpret=False)
        kpre, vcol, _ = fused.side_inputs(k, v, 256, mosaic_kernel.CHUNK, True, True, 1.0 / cfg.vcol_unscale)
        _, stats = mosaic_kernel.forward(q, k, v, kpre, vcol, cfg)
        clean = [float(jnp.max(jnp.abs(stats[i]) / stats[i + 1])) for i in (1, 5)]
        assert max(clean) < 1.0, clean
        _, bad = mosaic_kernel.forward(q, k, v, kpre.at[0, 1, -1, 0, 5].add(1e4), vcol.at[1, 0, 77, 0].add(1.0), cfg)
        qk = np.asarray(jnp.abs(bad[1]) > bad[2])
        pv = np.asarray(jnp.abs(bad[5]) > bad[6])
        assert qk[0, 2:4].all() and qk.sum() == 2 * 256
        assert pv[1, 0:2].any() and not pv[0].any() and not pv[1, 2:].any()


def test_selection_and_errors_anywhere():
    (q, k, v), _ = _inputs(0, "normal", "float16", H=64)
    if not HOPPER:
        assert fused.select_lowering(q) == "triton"
        with pytest.raises(ValueError, match="mosaic_gpu"):
            ftattn_jax.attention(q, k, v, implementation="pallas", lowering="mosaic_gpu")
    with pytest.raises(ValueError, match="lowering"):
        ftattn_jax.attention(q, k, v, implementation="pallas", lowering="cuda")
    with pytest.raises(ValueError, match="implementation='pallas' only"):
        ftattn_jax.attention(q, k, v, lowering="triton")
    with pytest.raises(ValueError, match="interpret" if HOPPER else "Hopper"):
        ftattn_jax.attention(q, k, v, implementation="pallas", lowering="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="block_kv"):
        fused.MosaicBlocks(96).validate()
    out, rep = ftattn_jax.attention(q, k, v, implementation="pallas", lowering="triton", interpret=True)
    assert not bool(rep.detected)


@pytest.mark.parametrize("overlap", [False, True], ids=["in-turn", "overlap"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_lowers_for_cuda_anywhere(causal, overlap):
    """The Hopper kernel traces and lowers to Mosaic GPU for CUDA on any machine (no GPU needed),
    with and without the checks: catches API drift between JAX versions in CI."""
    if fused.compat.mosaic_gpu() is None:
        pytest.skip("this jaxlib has no Mosaic GPU")
    shapes = [jax.ShapeDtypeStruct(s, jnp.float16) for s in ((1, 200, 4, 64), (1, 300, 2, 64), (1, 300, 2, 64))]
    for which in ((), ("qk_row", "softmax_dmr", "pv_row")):
        cfg = fused.config((1, 200, 4, 64), (1, 300, 2, 64), "float16", scale=0.125, causal=causal, which=which,
                           n_faults=0, blocks=fused.MosaicBlocks(overlap=overlap), interpret=False)
        text = jax.jit(lambda q, k, v: fused.launch(q, k, v, None, None, cfg)).trace(*shapes).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text.lower()


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_replica_in_the_lowered_module(causal):
    """The Hopper kernel's module, as Mosaic GPU lowers it (any machine), holds one ``ex2.approx``
    per exponential of the softmax and as many again for the replica (plus the rescale factors)."""
    if fused.compat.mosaic_gpu() is None:
        pytest.skip("this jaxlib has no Mosaic GPU")
    count = {}
    for scheme in ("baseline", "dmr_softmax", "full"):
        text = kernel_ir.mosaic_ir((1, 256, 2, 64), (1, 256, 2, 64), "float16", scheme=scheme, is_causal=causal)
        count[scheme] = len(re.findall(r"llvm\.inline_asm[^\n]*ex2\.approx", text))
    assert count["baseline"] >= 64, count  # 64 elements of S per thread and tile (64 × 128 per warpgroup)
    assert count["dmr_softmax"] >= 2 * count["baseline"] - 4 and count["full"] == count["dmr_softmax"], count


_SASS_SCRIPT = """
import sys, jax, jax.numpy as jnp, ftattn_jax
q = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 2, 64), jnp.float16)
out, rep = ftattn_jax.attention(q, q, q, scheme=sys.argv[1], implementation="pallas", lowering="mosaic_gpu")
jax.block_until_ready(out)
"""


@pytest.mark.skipif(not HOPPER, reason="compiles the Hopper kernel (sm_90) and reads its PTX")
def test_softmax_replica_survives_compilation(tmp_path):
    """After LLVM: the PTX that Mosaic GPU compiled for ``dmr_softmax`` holds at least twice the
    ``ex2.approx`` instructions of ``baseline`` (a replica merged by common-subexpression
    elimination or dropped as dead code fails this; ptxas keeps distinct MUFU operations).
    Mosaic GPU writes the PTX with ``MOSAIC_GPU_DUMP_PTX`` and ``MOSAIC_GPU_DUMP_TO``."""
    counts = {}
    for scheme in ("baseline", "dmr_softmax"):
        dump = tmp_path / scheme
        dump.mkdir()
        env = dict(os.environ, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=str(dump),
                   PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
        run = subprocess.run([sys.executable, "-c", _SASS_SCRIPT, scheme], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        text = "".join(p.read_text(errors="replace") for p in dump.rglob("*") if p.is_file()) + run.stdout
        # PTX instructions (``ex2.approx.ftz.f32 %f1, %f2;``), not the inline-asm templates of the MLIR dumps
        counts[scheme] = len(re.findall(r"\bex2\.approx\.ftz\.f32\s+%", text))
    assert counts["baseline"] > 0, ("no PTX dumped", counts)
    assert counts["dmr_softmax"] >= 2 * counts["baseline"] - 4, counts
