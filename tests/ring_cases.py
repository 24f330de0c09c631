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
