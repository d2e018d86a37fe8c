"""The import graph of src/gradcent: no circle, and each step implementation is a leaf.

Read from the source with ``ast`` (imports inside functions count too), so a
circle hidden behind a lazy import fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# One file per step implementation; only gradcent.optim._impl chooses between them.
IMPL_MODULES = {
    "gradcent.optim._centralizer",
    "gradcent.optim._compiled",
    "gradcent.optim._native",
}


def _module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module → the gradcent modules it imports (``from pkg import mod`` names ``pkg.mod``)."""
    files = {_module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert IMPL_MODULES <= graph.keys()
    assert "gradcent.optim._impl" in graph["gradcent.optim._base"]
    assert "gradcent.rules" in graph["gradcent.optim.attach"]


def test_no_import_cycle_in_src():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("impl", sorted(IMPL_MODULES))
def test_each_impl_imports_no_other_impl(impl):
    assert import_graph()[impl] & IMPL_MODULES == set()


def test_checks_fail_on_a_cycle_and_on_an_impl_importing_another(tmp_path):
    # The checks above must be able to fail: a tiny package with both faults.
    pkg = tmp_path / "gradcent" / "optim"
    pkg.mkdir(parents=True)
    (tmp_path / "gradcent" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "_compiled.py").write_text("def f():\n    from gradcent.optim import _native\n")
    (pkg / "_native.py").write_text("from ._compiled import f\n")
    graph = import_graph(tmp_path)
    assert find_cycle(graph) == [
        "gradcent.optim._compiled",
        "gradcent.optim._native",
        "gradcent.optim._compiled",
    ]
    assert graph["gradcent.optim._compiled"] & IMPL_MODULES == {"gradcent.optim._native"}


def test_every_impl_is_registered_with_the_chooser():
    import gradcent.optim
    from gradcent.optim import _impl

    assert gradcent.optim.IMPLS == ("default", "fused", "native")
    assert set(_impl._REGISTERED) == set(gradcent.optim.IMPLS) - {"default"}


def test_dead_code_named_by_issue_15_stays_gone():
    # Only tests used them; the admission rule now lives in rules.admit alone.
    from gradcent import layouts
    from gradcent.experiments.distributed_run import DistRun

    assert not hasattr(DistRun, "barrier")
    assert not hasattr(layouts, "output_axes")
    assert not hasattr(layouts, "mode_spec")
