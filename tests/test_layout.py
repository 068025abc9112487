"""The code's shape: modules a reader can hold, no import cycle, every module on the layout page."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmcache"
MAX_LINES = 600  # docs/layout.md: a module holds one job, about 600 lines at most


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (`vlmcache.cli.train`)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports when it is imported (imports inside functions wait for a call)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        stmts = [node]
        if isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` blocks never run; try/except imports do
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            stmts = list(ast.walk(node))
        for stmt in stmts:
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                base = stmt.module or ""
                if stmt.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (stmt.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in stmt.names]
            else:
                continue
            for target in targets:
                # `import vlmcache.a.b` imports vlmcache and vlmcache.a too
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in known and prefix != name:
                        out.add(prefix)
    return out


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split along their jobs): {long}"


def test_no_import_cycle_between_modules():
    found = modules()
    graph = {name: top_level_imports(name, path, set(found)) for name, path in found.items()}
    # a package's __init__ importing its own submodules is how packages work; a cycle through them is not
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # parent package and its own submodule
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles at module level: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_layout_page_names_every_module():
    page = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", page)) | set(re.findall(r"`(\w+\.py)`", page))
    # rows name a module by path (`vlmcache/train.py`) or, after the first in a row, by file name (`runs.py`);
    # packages (`vlmcache/cli/`, `vlmcache/bench/`) name their submodules in prose
    missing = []
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        if path.parent != PACKAGE:
            if f"`{path.parent.relative_to(ROOT).as_posix()}/`" not in page:
                missing.append(rel)
            continue
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if rel not in named and path.name not in named:
            missing.append(rel)
    assert not missing, f"docs/layout.md does not say what these modules hold: {missing}"


@pytest.mark.parametrize(
    "public", ["vlmcache.losses", "vlmcache.metrics", "vlmcache.heads", "vlmcache.samplers", "vlmcache.stage2"]
)
def test_the_public_interface_in_design_md_imports(public):
    import importlib

    module = importlib.import_module(public)
    wanted = {
        "vlmcache.losses": ["build_loss", "LOSSES"],
        "vlmcache.metrics": ["shot_accuracy"],
        "vlmcache.heads": ["build_head"],
        "vlmcache.samplers": ["build_sampler"],
        "vlmcache.stage2": ["build_stage2"],
    }[public]
    assert all(hasattr(module, w) for w in wanted)
