"""The import rules of DESIGN.md, checked on the source: every import of every module
(function-local ones included) against the rules, and no cycle between modules."""

from __future__ import annotations

import ast
import fnmatch
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ftattn_spec", "ftattn_jax", "ftattn_torch", "compare", "examples")
OURS = PACKAGES


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """Absolute names of what module ``name`` imports (a submodule where ``from x import y`` names one)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                sub = f"{source}.{a.name}"
                found.add(sub if sub in MODULES else source)
    return found


def _block(name: str, arrow: str) -> list[tuple[str, list[str]]]:
    """The ````name`` block of DESIGN.md as ``(pattern, [names])`` lines split at ``arrow``."""
    text = (ROOT / "DESIGN.md").read_text()
    block = re.search(rf"```{name}\n(.*?)```", text, re.S)
    assert block, f"DESIGN.md has no ```{name} block"
    out = []
    for line in block.group(1).splitlines():
        line = line.split("#")[0].strip()
        if line:
            lhs, _, rhs = line.partition(arrow)
            out.append((lhs.strip(), rhs.split()))
    return out


def _rules() -> list[tuple[str, list[str]]]:
    """``module pattern -> allowed patterns``; the first line that matches a module applies."""
    return _block("imports", "->")


def _forbidden() -> list[tuple[str, list[str]]]:
    """``module pattern -x forbidden top-level packages``."""
    return _block("third-party", "-x")


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return name == pattern[:-2] or name.startswith(pattern[:-1])
    return fnmatch.fnmatchcase(name, pattern)


def _internal(target: str) -> bool:
    return target.split(".")[0] in OURS


def test_every_module_has_a_rule():
    rules = _rules()
    missing = [m for m in MODULES if not any(_matches(m, lhs) for lhs, _ in rules)]
    assert not missing, f"modules without an import rule in DESIGN.md: {missing}"


def test_imports_follow_the_rules():
    rules = _rules()
    broken = []
    for name in MODULES:
        allowed = next(rhs for lhs, rhs in rules if _matches(name, lhs))
        for target in sorted(imports_of(name)):
            if _internal(target) and not any(_matches(target, p) for p in allowed):
                broken.append(f"{name} imports {target}")
    assert not broken, "imports DESIGN.md does not allow:\n" + "\n".join(broken)


def test_frameworks_stay_in_their_backend():
    forbidden = _forbidden()
    broken = []
    for name in MODULES:
        for lhs, tops in forbidden:
            if _matches(name, lhs):
                broken += [f"{name} imports {t}" for t in sorted(imports_of(name)) if t.split(".")[0] in tops]
    assert not broken, "\n".join(broken)


def test_no_import_cycle():
    graph = {m: {t for t in imports_of(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ re-exports its submodules; importing a submodule does not
    # make the package depend on its importer, so edges into __init__ from inside the
    # package are the only ones that could close a trivial loop: keep them all the same
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_imports():
    """The rule checker is able to fail: the torch SDPA drop-in imports the dispatcher, and the
    fused runner imports the fault injection inside ``from .. import``."""
    assert "ftattn_torch.api" in imports_of("ftattn_torch.sdpa")
    assert "ftattn_torch.faults" in imports_of("ftattn_torch.fused.runner")
    assert "ftattn_torch.fused.triton_kernel" in imports_of("ftattn_torch.fused.launch")  # a local import
