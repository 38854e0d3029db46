"""The package's shape holds: no import cycle among the project's modules (imports inside functions included), the
spec loads without torch, one list of dependency ranges, and the lint configuration passes."""

import ast
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """Every module of pretrain/ (and the root specifications.py) with the project modules it imports anywhere in
    its body: `from pretrain.training import telemetry` counts as importing pretrain.training.telemetry."""
    paths = [*sorted((REPO / "pretrain").rglob("*.py")), REPO / "specifications.py"]
    modules = {module_name(path): path for path in paths}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                if target in modules and target != name and not modules[target].name == "__init__.py":
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_project_modules():
    graph = project_imports()
    assert graph["pretrain.training.loop"] >= {"pretrain.training.telemetry", "pretrain.model.optimizer"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_package_never_imports_the_root_scripts():
    graph = project_imports()
    assert not [name for name, edges in graph.items() if name.startswith("pretrain") and "specifications" in edges]


def test_the_spec_loads_without_torch():
    code = ("import sys, specifications; spec = specifications.load_spec('specs.yaml', ['training_args.max_steps=20']);"
            " print(spec.training.max_steps, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["20", "False"], result.stderr


def test_requirements_txt_holds_the_ranges_of_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    ranges = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [r for r in ranges if r] == project["project"]["dependencies"]
    dev = [line.split("#")[0].strip() for line in (REPO / "requirements-dev.txt").read_text().splitlines()]
    assert [r for r in dev if r] == project["project"]["optional-dependencies"]["dev"]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
