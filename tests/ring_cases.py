"""The ring faults both backends' ring tests inject (4 devices or ranks; B=2, T=12, S=20, N=6,
K=3, H=8 or 16: chunks of 3 queries and 5 keys): ``(fault, device, step, the check that flags it)``.
``FUSED_CASES``: those a ring of fused blocks takes, float16 inputs (no ``lse`` fault: a fused
block has no second log-sum-exp; the key and value bits are float16's exponent bits)."""

from ftattn_spec.ring import RingFault

CASES = [
    (RingFault("probs", (1, 2, 7, 3), bit=29), 2, 2, "softmax_dmr"),
    (RingFault("scores", (0, 5, 4, 17), bit=27), 1, 2, "qk_row"),
    (RingFault("out", (1, 1, 11, 3), step=2, bit=28), 3, 2, "pv_row"),
    (RingFault("lse", (0, 0, 3), step=1, bit=26), 1, 1, "lse"),
    (RingFault("merge", (1, 4, 9, 2), step=2, bit=25), 3, 2, "merge"),
    (RingFault("key", (0, 1, 16, 5), step=1, bit=29), 0, 1, "key"),
    (RingFault("value", (0, 1, 16, 5), step=3, bit=28), 2, 3, "value"),
]

FUSED_CASES = [c for c in CASES if c[0].site not in ("lse", "key", "value")] + [
    (RingFault("key", (0, 1, 16, 5), step=1, bit=14), 0, 1, "key"),
    (RingFault("value", (0, 1, 16, 5), step=3, bit=13), 2, 3, "value"),
]

#: Faults in the checked backward (float32 intermediates): ``(fault, device, step, check)``, where
#: device and step are those the rank × step table names. The softmax's row sums are judged after
#: the last step; an accumulator corrupted as it leaves step r is seen on the next device at
#: step r + 1 (at home, after the last step).
BACKWARD_CASES = [
    (RingFault("bwd_scores", (1, 2, 7, 13), value=40.0), 2, 0, "bwd_qk_row"),
    (RingFault("bwd_probs", (0, 4, 4, 3), value=0.9), 1, 3, "bwd_softmax"),
    (RingFault("bwd_dp", (1, 0, 11, 19), value=-30.0), 3, 0, "bwd_dp_row"),
    (RingFault("bwd_ds", (0, 5, 2, 8), value=3.0), 0, 3, "bwd_ds"),
    (RingFault("bwd_dq", (1, 3, 5, 6), step=2, value=7.0), 1, 2, "bwd_dq"),
    (RingFault("bwd_dk", (0, 1, 9, 4), step=1, value=-9.0), 2, 1, "bwd_dk"),
    (RingFault("bwd_dv", (1, 2, 17, 0), step=3, bit=28), 2, 3, "bwd_dv"),
    (RingFault("bwd_dk_acc", (0, 0, 2, 5), step=1, value=11.0), 2, 2, "bwd_transit"),
    (RingFault("bwd_dv_acc", (1, 1, 12, 7), step=3, bit=29), 2, 3, "bwd_transit"),
]

#: The backward faults the fused ring backward's tests inject, one per kind of verdict: a row's
#: per step (bwd_dq), a key's that comes home with its chunk (bwd_dk), the softmax's over all
#: steps (bwd_probs) and an accumulator's in transit (bwd_dk_acc); every site of the kernels is
#: tested in one call by tests/test_fused_backward.py (and all nine on the CPU: docs/training.md).
FUSED_BACKWARD_CASES = [c for c in BACKWARD_CASES if c[0].site in ("bwd_probs", "bwd_dq", "bwd_dk", "bwd_dk_acc")]


def refusals(calls) -> dict:
    """``{name: "Type: message"}`` of each ``(name, call)`` that raised a ValueError or TypeError,
    None for a call that ran."""
    found = {}
    for name, call in calls:
        try:
            call()
            found[name] = None
        except (ValueError, TypeError) as e:
            found[name] = f"{type(e).__name__}: {e}"
    return found
