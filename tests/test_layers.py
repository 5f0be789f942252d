"""The package's layers (docs/ARCHITECTURE.md): a module imports only from its own package and the
packages below it, never from above, and module-level imports form no circle."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PKG = ROOT / "vae_cli"
# bottom to top; the top-level __main__ may use everything
LAYERS = ["core", "data", "models", "evaluation", "artifacts", "engine", "api", "cli"]


def _module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path, top_level_only: bool) -> set[str]:
    """vae_cli modules imported by a file (inside functions too, unless top_level_only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vae_cli"):
            for alias in node.names:  # `from vae_cli.data import folder` names a module
                sub = f"{node.module}.{alias.name}"
                is_module = (PKG.parent / (sub.replace(".", "/") + ".py")).is_file() or \
                    (PKG.parent / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vae_cli")}
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return len(LAYERS) if parts[-1] == "__main__" else -1  # vae_cli itself (__version__): the bottom
    return LAYERS.index(parts[1])


def _sources():
    return sorted(PKG.rglob("*.py"))


def test_every_module_sits_in_a_layer():
    loose = [_module_name(p) for p in _sources()
             if _layer(_module_name(p)) == -1 and _module_name(p) != "vae_cli"]
    assert not loose, f"modules outside the layer packages: {loose}"


def test_no_module_imports_a_higher_layer_or_a_peer_package():
    wrong = []
    for path in _sources():
        me = _module_name(path)
        for target in _imports(path, top_level_only=False):
            if _layer(target) > _layer(me):
                wrong.append(f"{me} imports {target} (layer {LAYERS[_layer(target)]} is above)")
    assert not wrong, "\n".join(wrong)


def test_module_level_imports_have_no_circles():
    graph = {_module_name(p): {t for t in _imports(p, top_level_only=True)} for p in _sources()}
    # importing a.b also runs package a's __init__: add that edge
    for mod in list(graph):
        for dep in list(graph[mod]):
            parent = dep.rsplit(".", 1)[0]
            if parent in graph and parent != mod and not mod.startswith(parent + "."):
                graph[mod].add(parent)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle.extend(stack[stack.index(dep):] + [node, dep] if dep in stack else [node, dep])
                return True
            if state.get(dep) is None and visit(dep, stack + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(m, []) for m in sorted(graph) if state.get(m) is None), f"import circle: {cycle}"


def test_the_layer_test_catches_an_upward_import(tmp_path):
    """The checker itself: a core module importing the engine is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vae_cli.engine.train import train\n")
    assert _layer("vae_cli.core.bad") < max(_layer(t) for t in _imports(bad, top_level_only=False))


# the loop and its parts read top to bottom: no function in engine/ longer than this many lines (issue 32)
ENGINE_FUNCTION_LINES = 40


def test_no_function_in_the_engine_is_longer_than_40_lines():
    long = []
    for path in sorted((PKG / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > ENGINE_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_every_command_says_whether_it_computes():
    """Commands are registered through `cli.app.command(name, computes=...)`, which fills COMPUTING (the
    commands that announce themselves to other vae jobs); none goes around it."""
    import vae_cli.cli  # noqa: F401  (registers the commands)
    from vae_cli.cli.app import COMPUTING, app

    names = {c.name for c in app.registered_commands}
    assert names == COMPUTING | {"info"}
    assert {"train", "eval", "classify", "sample", "embed", "export", "plot", "calibrate"} <= COMPUTING
    for path in (PKG / "cli").glob("*.py"):
        assert "@app.command" not in path.read_text(encoding="utf-8"), path.name
