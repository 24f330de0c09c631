"""``softmax_exp`` in the portable Pallas kernel (``implementation="pallas"``, lowering
``"triton"``): clean runs pass with margin at every input distribution and mask form, at the
interpreter's tiles and the GPU's; a probability corrupted after the exponential is flagged at
its row down to the floor the tolerance model predicts, with the unfused path's verdict; the
policies and the global granularity see it; the Hopper kernel takes the check from jax 0.11 on.

Interpreted on the CPU (Pallas' interpret mode); compiled on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import ftattn_jax  # noqa: E402
from ftattn_jax import fused  # noqa: E402
from ftattn_jax.fused import mosaic_kernel  # noqa: E402
from ftattn_spec import reference as ref  # noqa: E402
from ftattn_spec.faults import Fault  # noqa: E402
from ftattn_spec.inputs import DISTRIBUTIONS  # noqa: E402

from .fused_cases import SHAPE  # noqa: E402
from .inputs import exact, make_qkv  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

INTERPRET = jax.default_backend() != "gpu"
SCHEMES = ("abft_softmax", "abft_all")
B, N, K, T, S, H = (SHAPE[a] for a in "BNKTSH")


def _inputs(seed, dist="normal", dtype="float16", **shape):
    """``(q, k, v)`` in ``BTNH``/``BSKH`` and their float64 values in the logical layout."""
    arrs = make_qkv(seed, dist, framework="jax", dtype=dtype, shape=SHAPE, **shape)
    return arrs, [exact(x) for x in arrs]


def attn(q, k, v, **kw):
    return ftattn_jax.attention(q, k, v, implementation="pallas", interpret=INTERPRET, **kw)


def _worst(report):
    return {n: float(jnp.max(c.residual / c.threshold)) for n, c in report.checks.items()}


def _rows(report):
    """The (b, n, i) of every row any check flags."""
    flags = np.any([np.asarray(c.flagged) for c in report.checks.values()], axis=0)
    return [tuple(int(x) for x in r) for r in np.argwhere(flags)]


def _largest_prob(q, k, b, n, i, allowed=None):
    """The key of row (b, n, i)'s largest attended logit (``allowed``: the logical B N T S mask):
    its probability is exactly 1 in the kernel (the running maximum at its tile is its own logit)."""
    s = np.asarray(k[b, :, n // (N // K)], np.float64) @ np.asarray(q[b, i, n], np.float64)
    return int(np.argmax(s if allowed is None else np.where(allowed[b, n, i], s, -np.inf)))


def test_shape_axes_differ():
    assert len({SHAPE[a] for a in "BNKTSH"}) == 6


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_clean_runs_pass_with_margin(dist):
    for causal, dtype, scheme in ((False, "float16", "abft_softmax"), (True, "bfloat16", "abft_all")):
        (q, k, v), x = _inputs(3, dist, dtype)
        out, report = attn(q, k, v, is_causal=causal, scheme=scheme)
        worst = _worst(report)
        assert "softmax_exp" in report.checks and not bool(report.detected), (dist, causal, worst)
        assert worst["softmax_exp"] < 0.5, worst  # measured at most 0.11 (docs: the lead's table)
        c = report.checks["softmax_exp"]
        assert c.residual.shape == (B, N, T) and bool(jnp.all(c.threshold == 1.0))
        o64, p, _ = ref.attention(*x, is_causal=causal)
        bound = ref.output_bound(*x, p, o64, dtype=dtype, is_causal=causal)
        assert (np.abs(np.swapaxes(np.asarray(out, np.float64), 1, 2) - o64) / bound).max() <= 1.0


def test_gpu_tiles_and_magnitudes_pass():
    """The GPU's tile of 64 keys (three tiles per row, the last one partial), and logits from
    tiny to large: the bound grows with the tile and with |m·c|, the residual stays within it."""
    (q, k, v), _ = _inputs(4, "normal", S=150)
    kw = dict(checks=("softmax_exp",), granularity="vector", scale=H ** -0.5, interpret=INTERPRET,
              blocks=fused.BlockSizes(32, 64, 1, 1))
    for causal in (False, True):
        for magnitude in (1e-3, 1.0, 30.0):
            qs = (q.astype(jnp.float32) * magnitude).astype(q.dtype)
            _, report = fused.run(qs, k, v, is_causal=causal, **kw)
            assert not bool(report.detected) and _worst(report)["softmax_exp"] < 0.5, (causal, magnitude)


def _masks(rng):
    yield "mask", dict(mask=jnp.asarray(rng.random((B, 1, T, S)) < 0.7).at[1, 0, 5].set(False))
    yield "bias", dict(bias=jnp.asarray(rng.standard_normal((1, N, T, S)) * 3, jnp.float32))
    yield "lengths", dict(query_seq_lengths=jnp.asarray([T, 20, 0], jnp.int32),
                          key_value_seq_lengths=jnp.asarray([S, 7, 30], jnp.int32))
    yield "window", dict(local_window_size=(5, 3))
    yield "bias+mask+causal", dict(bias=jnp.asarray(rng.standard_normal((B, N, T, S)), jnp.float32),
                                   mask=jnp.asarray(rng.random((T, S)) < 0.5), is_causal=True)


MASKS = dict(_masks(np.random.default_rng(1)))


@pytest.mark.parametrize("form", list(MASKS))
def test_every_mask_form_passes_clean(form):
    (q, k, v), _ = _inputs(5, "normal")
    _, report = attn(q, k, v, scheme="abft_softmax", **MASKS[form])
    assert not bool(report.detected), (form, _worst(report))
    res = np.asarray(report.checks["softmax_exp"].residual)
    assert np.isfinite(res).all() and res.max() < 0.5
    if form == "lengths":  # rows beyond the query length attend nothing: 0
        assert (res[1, :, 20:] == 0).all() and (res[2] == 0).all()
    if form == "mask":  # a row with nothing attended: 0
        assert (res[1, :, 5] == 0).all()


@pytest.mark.parametrize("bit", [30, 23, 22, 21])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_corrupted_probability_is_flagged_at_its_row(bit, scheme):
    """An exponent bit (×2 or inf) or the top mantissa bits (+50%, +25%) of the row's largest
    probability: that row, and only it, is flagged."""
    (q, k, v), _ = _inputs(6, "normal")
    b, n, i = 1, 2, 17
    f = Fault("probs", (b, n, i, _largest_prob(q, k, b, n, i)), bit=bit)
    _, report = attn(q, k, v, scheme=scheme, fault=f)
    c = report.checks["softmax_exp"]
    assert bool(c.flagged[b, n, i]), (bit, float(c.residual[b, n, i]))
    assert int(c.flagged.sum()) == 1 and _rows(report) == [(b, n, i)]


def test_detection_floor_of_one_probability():
    """A relative error δ in one probability moves L by log₂(1 + δ): with the interpreter's tiles
    of 16 keys flagged from about 1.5e-4 (normal inputs; 7e-4 to 1.5e-3 at the GPU's 64)."""
    (q, k, v), _ = _inputs(7, "normal")
    b, n, i = 0, 1, 9
    j = _largest_prob(q, k, b, n, i)
    _, clean = attn(q, k, v, scheme="abft_softmax")
    res = {}
    for delta in (1e-2, 1e-3, -1e-3, 1e-5):
        _, rep = attn(q, k, v, scheme="abft_softmax", fault=Fault("probs", (b, n, i, j), value=1.0 + delta))
        c = rep.checks["softmax_exp"]
        res[delta] = (bool(c.flagged[b, n, i]), float(c.residual[b, n, i]), int(c.flagged.sum()))
    assert all(res[d][0] and res[d][2] == 1 for d in (1e-2, 1e-3, -1e-3)), res
    assert not res[1e-5][0], res
    assert float(clean.checks["softmax_exp"].residual[b, n, i]) < res[1e-3][1]


def _unfused_ready():
    from ftattn_jax.unfused import checks

    return hasattr(checks, "softmax_exp")


def _plans(q, k, allowed):
    """Large faults in attended probabilities (the largest, and another) and one in a masked one."""
    rng = np.random.default_rng(2)
    att, msk = np.argwhere(allowed), np.argwhere(~allowed)
    b, n, i = (int(x) for x in att[rng.integers(len(att))][:3])
    plans = [Fault("probs", (b, n, i, _largest_prob(q, k, b, n, i, allowed)), bit=22),
             Fault("probs", tuple(int(x) for x in att[rng.integers(len(att))]), bit=30)]
    if len(msk):
        plans.append(Fault("probs", tuple(int(x) for x in msk[rng.integers(len(msk))]), bit=30))
    return plans


@pytest.mark.parametrize("form", ["none", "causal", "mask", "lengths"])
def test_verdicts_agree_with_unfused(form):
    """The same rows flagged as by the unfused softmax_exp (or, until that exists, by the
    unfused softmax_dmr of ``full``) on faults in attended and in masked probabilities; a
    masked probability that is not 0 fails closed."""
    from ftattn_spec import masking

    kw = {"none": {}, "causal": dict(is_causal=True), **MASKS}[form]
    (q, k, v), _ = _inputs(8, "normal")
    sw = lambda x: None if x is None else np.asarray(x)  # noqa: E731
    allowed = masking.allowed(B, N, T, S, mask=sw(kw.get("mask")), is_causal=kw.get("is_causal", False),
                              query_lengths=sw(kw.get("query_seq_lengths")),
                              key_lengths=sw(kw.get("key_value_seq_lengths")))
    name, scheme = ("softmax_exp", "abft_softmax") if _unfused_ready() else ("softmax_dmr", "dmr_softmax")
    for f in _plans(q, k, allowed):
        _, rf = attn(q, k, v, scheme="abft_softmax", fault=f, **kw)
        _, ru = ftattn_jax.attention(q, k, v, scheme=scheme, fault=f, **kw)
        ff, fu = np.asarray(rf.checks["softmax_exp"].flagged), np.asarray(ru.checks[name].flagged)
        np.testing.assert_array_equal(ff, fu, err_msg=str(f))
        assert ff[f.index[:3]] and ff.sum() == 1, f
        if not allowed[f.index]:
            assert float(rf.checks["softmax_exp"].residual[f.index[:3]]) == np.inf


def test_policies_and_global_granularity():
    (q, k, v), _ = _inputs(9, "normal")
    b, n, i = 2, 1, 30
    f = Fault("probs", (b, n, i, _largest_prob(q, k, b, n, i)), bit=21)
    clean, _ = attn(q, k, v, scheme="abft_softmax")
    out, rep = attn(q, k, v, scheme="abft_softmax", fault=f, on_fault="correct")
    assert bool(rep.detected) and int(rep.corrected) == 1 and bool(jnp.all(out == clean))
    out, _ = attn(q, k, v, scheme="abft_softmax", fault=f, on_fault="nan")
    bad = np.isnan(np.asarray(out, np.float32)).any(-1)  # B T N
    assert bad[b, i, n] and bad.sum() == 1
    _, g = attn(q, k, v, scheme="abft_softmax", granularity="global", fault=f)
    c = g.checks["softmax_exp"]
    assert c.residual.shape == (B, N) and bool(c.flagged[b, n]) and int(c.flagged.sum()) == 1
    _, g = attn(q, k, v, scheme="abft_softmax", granularity="global")
    assert not bool(g.detected)


def test_nonfinite_and_negative_probabilities_fail_closed():
    (q, k, v), _ = _inputs(10, "normal")
    for f in (Fault("probs", (0, 0, 3, 2), value=float("nan")), Fault("probs", (0, 3, 4, 5), value=float("inf")),
              Fault("probs", (1, 1, 6, _largest_prob(q, k, 1, 1, 6)), bit=31)):
        _, rep = attn(q, k, v, scheme="abft_softmax", fault=f)
        c = rep.checks["softmax_exp"]
        assert bool(c.flagged[f.index[:3]]) and int(c.flagged.sum()) == 1, f


def test_gradients_with_the_check():
    """The checked backward runs under ``abft_softmax`` and gives plain attention's gradients."""
    (q, k, v), _ = _inputs(11, "normal", T=20, S=24)
    w = jnp.linspace(-1, 1, H)
    grads = [jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)[0].astype(jnp.float32) * w),
                      argnums=(0, 1, 2))(q, k, v)
             for fn in (lambda *a: attn(*a, is_causal=True, scheme="abft_softmax"),
                        lambda *a: ftattn_jax.attention(*a, is_causal=True, scheme="baseline"))]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3, rtol=1e-2)


def test_the_hopper_kernel_takes_softmax_exp_from_jax_0_11(monkeypatch):
    """The Hopper kernel reads the probabilities' exponent fields, which needs Mosaic GPU's bitcast
    of registers: with an older JAX it refuses the check, says why, and ``"auto"`` takes the
    portable kernel; with jax >= 0.11 (patched here, as on a Hopper GPU) it takes it."""
    (q, k, v), _ = _inputs(12, "normal", H=64)
    checks = ("qk_row", "softmax_exp", "pv_row")
    monkeypatch.setattr(mosaic_kernel, "can_inject", lambda: False)
    why = mosaic_kernel.unsupported(q, platform="gpu", interpret=False, checks=checks)
    assert why is not None and "softmax_exp" in why and "0.11" in why
    assert fused.select_lowering(q, checks=checks) == "triton"
    with monkeypatch.context() as m:  # as on a Hopper GPU: "auto" takes the portable kernel and says why
        m.setattr(fused.runner, "platform_of", lambda x: "gpu")
        m.setattr(mosaic_kernel, "available", lambda: True)
        assert fused.select_lowering(q, interpret=False) == "mosaic_gpu"
        assert fused.runner.explain_lowering(q, interpret=False, checks=checks) == ("triton", why)
        with pytest.raises(ValueError, match="mosaic_gpu.*softmax_exp"):
            fused.select_lowering(q, lowering="mosaic_gpu", interpret=False, checks=checks)
    with pytest.raises(ValueError, match="softmax_exp"):
        mosaic_kernel.config(q.shape, k.shape, "float16", scale=0.125, causal=False, which=checks, n_faults=0,
                             blocks=fused.MosaicBlocks())
    with pytest.raises(ValueError, match="mosaic_gpu"):
        ftattn_jax.attention(q, k, v, implementation="pallas", lowering="mosaic_gpu", scheme="abft_softmax")
    monkeypatch.setattr(mosaic_kernel, "can_inject", lambda: True)
    with monkeypatch.context() as m:
        m.setattr(fused.runner, "platform_of", lambda x: "gpu")
        m.setattr(mosaic_kernel, "available", lambda: True)
        assert mosaic_kernel.unsupported(q, platform="gpu", interpret=False, checks=checks) is None
        assert fused.runner.explain_lowering(q, interpret=False, checks=checks) == ("mosaic_gpu", None)
    cfg = mosaic_kernel.config(q.shape, k.shape, "float16", scale=0.125, causal=False, which=checks, n_faults=0,
                               blocks=fused.MosaicBlocks())
    assert (cfg.qk, cfg.dmr, cfg.exp, cfg.pv) == (True, False, True, True)
    assert cfg.n_stats == 1 + 2 * 3 and cfg.exp_logs == "quads"  # the fastest on the H200 (docs/kernels.md)
    with pytest.raises(ValueError, match="exp_logs"):
        fused.MosaicBlocks(exp_logs="log2")


def test_the_check_lowers_through_triton_for_cuda(tmp_path):
    """The exponent fields (bitcasts, shifts) and the mantissas' logarithms go through Pallas'
    Triton lowering and Triton's compiler to sm_90 code, on any machine."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from .test_pallas import _strip_locations

    ttir = fused.kernel_ir.triton_ir((1, 256, 2, 64), (1, 256, 2, 64), "float16", scheme="abft_all",
                                     is_causal=True, blocks=fused.BlockSizes(128, 64, 4, 2))
    path = tmp_path / "abft_all.ttir"
    path.write_text(_strip_locations(ttir))
    ptx = triton.compile(str(path), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "shr.s32" in ptx and "ex2.approx" in ptx


def test_auto_says_when_the_scheme_keeps_the_hopper_kernel_off(monkeypatch):
    """Where the Hopper kernel could run (patched here), ``lowering="auto"`` with a scheme it lacks
    takes the portable kernel and warns once, naming the check; a device that cannot run it
    (this CPU) gives no warning."""
    import warnings

    from ftattn_spec import implementations

    (q, k, v), _ = _inputs(13, "normal", H=64)
    monkeypatch.setattr(mosaic_kernel, "can_inject", lambda: False)  # a JAX whose Hopper kernel lacks the check
    with warnings.catch_warnings():
        warnings.simplefilter("error", implementations.FallbackWarning)
        ftattn_jax.attention(q, k, v, implementation="pallas", scheme="abft_softmax")
    monkeypatch.setattr(fused, "hopper_ready", lambda query, interpret: True)
    monkeypatch.setattr(implementations, "_WARNED", set())
    with pytest.warns(implementations.FallbackWarning, match="portable Pallas kernel.*softmax_exp"):
        _, rep = ftattn_jax.attention(q, k, v, implementation="pallas", scheme="abft_softmax")
    assert "softmax_exp" in rep.checks


_ROW_SITES = [("rescale", 25), ("rowsum", 27), pytest.param("rescale", 22, marks=pytest.mark.slow),
              pytest.param("rowsum", 20, marks=pytest.mark.slow)]


@pytest.mark.parametrize("site, bit", _ROW_SITES)
def test_a_corrupted_rescale_factor_or_row_sum_is_flagged(site, bit):
    """The rescale factor (site ``rescale``, fused only) is evaluated twice by ``softmax_exp``; a
    tile's row sum (site ``rowsum``, fused only) enters l, which ``softmax_exp`` compares with the
    tensor cores' P̂·1 (vcol's column of ones; the tiles' L and R alone never read l). A fault at
    either is flagged at its row, and only there, as the DMR flags it; the unfused path and the
    Hopper kernel refuse both sites."""
    from ftattn_spec import faults as spec_faults

    (q, k, v), _ = _inputs(14, "normal", S=70, H=64)
    b, n, i = 1, 3, 21
    clean, _ = ftattn_jax.attention(q, k, v, implementation="pallas", scheme="abft_softmax")
    f = Fault(site, (b, n, i, 60), bit=bit)
    for scheme, check in (("abft_softmax", "softmax_exp"), ("full", "softmax_dmr")):
        out, rep = ftattn_jax.attention(q, k, v, implementation="pallas", scheme=scheme, fault=f)
        assert not bool(jnp.all(out[b, i, n] == clean[b, i, n])) and bool(jnp.all(out[b, i + 1] == clean[b, i + 1]))
        c = rep.checks[check]
        assert bool(c.flagged[b, n, i]) and int(c.flagged.sum()) == 1, (scheme, float(c.residual[b, n, i]))
    with pytest.raises(ValueError, match=f"{site}.*fused forward"):
        ftattn_jax.attention(q, k, v, implementation="unfused", fault=f)
    with pytest.MonkeyPatch.context() as m:  # as on a Hopper GPU with jax >= 0.11
        m.setattr(mosaic_kernel, "available", lambda: True)
        m.setattr(mosaic_kernel, "can_inject", lambda: True)
        why = mosaic_kernel.unsupported(q, platform="gpu", interpret=False, plan=spec_faults.plan([f]))
    assert why is not None and site in why
