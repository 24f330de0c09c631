"""The README's support table is the catalogue's, and its commands are the ones CI runs."""

from __future__ import annotations

import pathlib
import re

from ftattn_spec.implementations import CATALOGUE, MASK_FORMS, support_table, unsupported

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_support_table_is_generated_from_the_catalogue():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- support-table:begin -->\n(.*?)\n<!-- support-table:end -->", text, re.S)
    assert block, "README.md lost its support-table markers"
    assert block.group(1) == support_table(), ("README's table differs from the catalogue: regenerate it with "
                                               "python -c 'from ftattn_spec.implementations import support_table; "
                                               "print(support_table())'")


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"python -m pip install [^\n]*&& python -m pytest -q", ci)
    assert command and command.group(0) in readme


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_catalogue_answers_with_reasons():
    """Every fused record refuses float32 and odd head dims, naming the argument, and takes every
    mask form; a lowering that takes fewer (the Hopper kernel) names them."""
    for rec in CATALOGUE:
        ok = unsupported(rec.backend, rec.name, scheme="full", dtype="float16", q_shape=(2, 3, 4, 64))
        assert ok is None, (rec, ok)
        if not rec.fused:
            continue
        r = unsupported(rec.backend, rec.name, scheme="full", dtype="float32", q_shape=(2, 3, 4, 64))
        assert r.argument == "query" and r.error is TypeError and "float32" in r.message
        r = unsupported(rec.backend, rec.name, scheme="full", dtype="float16", q_shape=(2, 3, 4, 24))
        assert r.argument == "query" and "H=24" in r.message
        r = unsupported(rec.backend, rec.name, scheme="abft_qk_col", dtype="float16", q_shape=(2, 3, 4, 64))
        assert r.argument == "scheme"
        r = unsupported(rec.backend, rec.name, scheme="full", dtype="float16", q_shape=(2, 3, 4, 64),
                        masking=[("attn_mask", None), ("attn_mask", object()), ("q_len", object()),
                                 ("kv_len", object()), ("window", (2, 3))])
        assert r is None and set(rec.mask_forms) == set(MASK_FORMS)
        for lo in rec.lowerings:
            assert set(lo.mask_forms) <= set(MASK_FORMS) and "causal" in lo.mask_forms
