"""The package's layering (docs/architecture.md): every import of an lpc module, at module level or
inside a function, points down. A method module never imports training, evaluation, experiments or
the config layer, so the method can be read and reused alone. No import cycle, and no function over 80
lines anywhere in src/."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import SRC

PKG = SRC / "lpc"
# Lower number = lower layer. A module may import its own layer or any lower one.
LAYERS = {
    "lpc.errors": 0,
    "lpc.files": 0,
    "lpc.stats": 0,
    "lpc.offline": 0,
    "lpc.progress": 0,
    "lpc.conf": 0,
    "lpc.environment": 0,
    "lpc.losses": 1,
    "lpc.latent": 1,
    "lpc.policy": 1,
    "lpc.data": 2,
    "lpc.backbones": 2,
    "lpc.adapters": 2,
    "lpc.training": 3,
    "lpc.evaluation": 4,
    "lpc.experiments": 5,
    "lpc.config": 6,
    "lpc.run": 6,
    "lpc.preflight": 6,
    "lpc.train": 6,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(name: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def lpc_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported lpc module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        out += [(n, id(node) in top) for n in names if n == "lpc" or n.startswith("lpc.")]
    return out


MODULES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    me = module_name(path)
    for name, _ in lpc_imports(path):
        assert layer(name) <= layer(me), f"{me} (layer {layer(me)}) imports {name} (layer {layer(name)})"


def test_the_package_has_no_import_cycle():
    """No cycle through any import, a function's included: a function-level import may break a cycle at load
    time, but the two modules still need each other (so neither can be read or tested alone)."""
    graph = {module_name(p): {n for n, _ in lpc_imports(p)} for p in MODULES}
    modules = set(graph)

    def owner(name: str) -> str | None:  # ``from lpc.data import x`` is lpc.data's __init__
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {o for n in names if (o := owner(n)) and o != m} for m, names in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] if nxt in stack else [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle + [node, nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [node])
        state[node] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [])


MAX_FUNCTION_LINES = 80


def test_no_function_is_over_80_lines():
    """A function longer than a screen mixes concerns (issue 22): split it into named steps. Counted from
    ``def`` to its last line, docstring and comments included."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_method_stands_alone():
    for name in ("losses", "latent", "policy"):
        imported = {n for n, _ in lpc_imports(PKG / f"{name}.py")}
        assert imported <= {"lpc.errors"}, (name, imported)


# ---------------------------------------------------------------------- adding a loss: one class + one config
class Hinge:
    """The SLiC-HF hinge loss ``max(0, 1 - beta (rho_w - rho_l))``, the docs/architecture.md example, defined
    here (outside the package) to show that nothing in lpc gates on the algorithm's name."""

    name = "hinge"
    needs_reference = True
    average_logps = False

    def __init__(self, beta: float = 0.1, name: str = "hinge"):
        self.beta = beta

    def __call__(self, chosen, rejected, ref_chosen=None, ref_rejected=None):
        from lpc.losses import LossOutput

        cr, rr = chosen - ref_chosen, rejected - ref_rejected
        return LossOutput((1 - self.beta * (cr - rr)).clamp_min(0), self.beta * cr, self.beta * rr)


def test_a_new_loss_needs_only_its_class_and_a_config(tmp_path):
    import os

    from conftest import FAST, read_metrics, run_train

    here = os.pathsep.join(str(d) for d in Path(__file__).resolve().parents[:2])  # this module and its conftest
    proc = run_train(
        FAST
        + [
            "trainer.max_steps=10",
            "algo._target_=test_architecture.Hinge",
            "algo.name=hinge",
            "latent=discrete",
            "codebook=4",
        ],
        tmp_path,
        env={"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])},
    )
    m = read_metrics(tmp_path)
    assert m["status"] == "completed" and m["train/steps"] == 10, proc.stdout[-500:]
    # the hinge loss with beta 0.1 at the reference (rho = 0) is exactly 1 on the first step
    first = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])
    assert 0.0 < first["loss"] <= 1.2
