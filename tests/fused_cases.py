"""Inputs and fault plans shared by the fused kernels' suites (``test_fused.py``, ``test_pallas.py``),
so both kernels are held to the same cases."""

from ftattn_spec.faults import Fault

# every axis a different size; T, S not multiples of the tiles (16 in the
# interpreters, 64 or 128 on a GPU); grouped-query (K < N)
SHAPE = dict(B=3, N=4, K=2, T=37, S=45, H=16)

CASES = [
    dict(dtype="float16", is_causal=False),
    dict(dtype="float16", is_causal=True),
    dict(dtype="bfloat16", is_causal=False),
    dict(dtype="bfloat16", is_causal=True),
    dict(dtype="float16", is_causal=True, T=45, S=29),  # T > S: rows past S attend every key
    dict(dtype="float16", is_causal=False, T=5, S=70, K=1),  # one kv head, one query block
    dict(dtype="float16", is_causal=True, H=32, B=2, N=3, K=3),  # multi-head (K = N)
    dict(dtype="bfloat16", is_causal=False, H=64, B=1, N=4, K=2, T=20, S=33),
]

FAULTS = [
    Fault("scores", (1, 3, 30, 4), bit=30),
    Fault("scores", (0, 1, 20, 11), value=1e4),
    Fault("probs", (0, 2, 17, 9), bit=29),
    Fault("probs", (1, 0, 36, 2), bit=30, replica=1),
    Fault("out", (1, 1, 33, 5), bit=30),
    Fault("out", (0, 3, 0, 0), value=-1e3),
]


def triton_device() -> str:
    """The device the Triton kernels run on in this session (``FTATTN_TEST_TORCH_DEVICE``), after
    skipping the calling module where they cannot run (no triton; no GPU and no interpreter)."""
    import os

    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("triton")
    device = os.environ.get("FTATTN_TEST_TORCH_DEVICE", "cpu")
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
    return device

