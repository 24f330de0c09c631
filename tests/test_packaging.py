"""Import isolation and the spec's framework-freedom, each checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import HAVE_JAX, HAVE_TORCH


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_spec_imports_no_framework():
    mods = _modules_after_import("ftattn_spec")
    assert not mods & {"jax", "jaxlib", "torch", "triton"}, mods & {"jax", "jaxlib", "torch", "triton"}


@pytest.mark.skipif(not HAVE_JAX, reason="jax is not installed")
def test_ftattn_jax_does_not_import_torch():
    mods = _modules_after_import("ftattn_jax")
    assert "jax" in mods
    assert "torch" not in mods and "triton" not in mods


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_ftattn_torch_does_not_import_jax():
    mods = _modules_after_import("ftattn_torch")
    assert "torch" in mods
    assert "jax" not in mods and "jaxlib" not in mods
    assert "triton" not in mods  # the fused kernels are imported on first use


def test_compare_package_imports_without_frameworks():
    mods = _modules_after_import("compare")
    assert not mods & {"jax", "torch"}
