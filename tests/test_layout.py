"""The package layout: `ming/` is a model library (torch/numpy; no Gradio, no serving code), `serving/` builds on
it without Gradio, and only app.py imports Gradio. No module imports another that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UI_PACKAGES = {"gradio", "gradio_client", "spaces"}


def imports_of(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved), at any depth in the file."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.name == "__init__.py":
        module = package
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_graph() -> dict[str, set[str]]:
    files = [*REPO.glob("ming/**/*.py"), *REPO.glob("serving/**/*.py")]
    modules = {}
    for path in files:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return {name: {dep for dep in imports_of(path) if dep in modules and dep != name} for name, path in modules.items()}


def test_the_model_library_never_imports_the_ui_or_the_serving_layer():
    for path in REPO.glob("ming/**/*.py"):
        top = {name.split(".")[0] for name in imports_of(path)}
        assert not top & (UI_PACKAGES | {"serving", "app"}), f"{path.relative_to(REPO)} imports {top & (UI_PACKAGES | {'serving', 'app'})}"


def test_the_serving_layer_never_imports_gradio():
    for path in REPO.glob("serving/**/*.py"):
        top = {name.split(".")[0] for name in imports_of(path)}
        assert not top & {"gradio", "gradio_client", "app"}, f"{path.relative_to(REPO)} imports the UI"


def test_no_import_cycles():
    graph = project_graph()
    assert "ming.layers" in graph and "serving.engine" in graph
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_importing_the_model_library_leaves_gradio_out():
    code = ("import sys, ming, ming.speech, ming.modeling, ming.processor, ming.testing.tiny; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'gradio', 'spaces', 'serving'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_speech_builds_on_the_shared_layers_not_on_the_thinker():
    thinker = {"ming.llm", "ming.modeling", "ming.generation", "ming.vision"}  # the fbank in ming.audio is shared
    for path in REPO.glob("ming/speech/*.py"):
        assert not imports_of(path) & thinker, f"{path.relative_to(REPO)} imports {imports_of(path) & thinker}"
