"""The package's structure: imports point one way (README, "Design").

Every ``.py`` file under ``pyvae/`` is parsed (``ast``, imports inside functions included) and its imports
of other pyvae modules become edges. The checks: no import cycle; no module imports another module's
private name (``from .x import _name``, ``x._name``); every edge points to the same or a lower layer of
``LAYERS`` (so the op library and the model layer import no application module); the compiled core
``pyvae._C`` is imported by at most two modules. The checker is tested on a small made-up package too,
so that it is known to find each kind of fault.
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import pyvae

# Lowest first. A module may import modules of its own layer or of the layers below it.
LAYERS = [
    ("compiled core", ["pyvae._C"]),
    ("gate", ["pyvae._gate", "pyvae.reference", "pyvae._version"]),
    ("GEMM backends", ["pyvae._gemm", "pyvae._cublaslt", "pyvae._tune"]),
    ("ops", ["pyvae.ops", "pyvae.ops.*", "pyvae._linear"]),
    ("nn", ["pyvae.nn"]),
    ("inference", ["pyvae.inference"]),
    ("models", ["pyvae.models"]),
    ("data, checkpoints, evaluation, plots", ["pyvae.data", "pyvae.checkpoint", "pyvae.evaluation", "pyvae.plots",
                                              "pyvae.tuning"]),
    ("train", ["pyvae.train"]),
    ("runs", ["pyvae.runs"]),
    ("application", ["pyvae", "pyvae.cli", "pyvae.__main__", "pyvae.benchmarks", "pyvae.benchmarks.*"]),
]
LIBRARY = ("compiled core", "gate", "GEMM backends", "ops", "nn", "inference", "models")
PACKAGE_DIR = Path(pyvae.__file__).resolve().parent


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules(root: Path, package: str) -> Dict[str, Path]:
    mods = {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    for ext in list(root.glob("_C.*")):  # the compiled extension, when built in place
        mods.setdefault(f"{package}._C", ext)
    mods.setdefault(f"{package}._C", root / "_C")
    return mods


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(root: Path, package: str) -> Tuple[Dict[str, Set[str]], List[str]]:
    """``(edges, private)``: module -> the package modules it imports; and each use of another module's
    private name, as ``"module: what"``."""
    mods = _modules(root, package)
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    private: List[str] = []
    for mod, path in mods.items():
        if path.suffix != ".py":
            continue
        here = mod if _is_package(path) else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        aliases: Dict[str, str] = {}  # local name -> package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == package or a.name.startswith(package + "."):
                        target = a.name if a.name in mods else a.name.rpartition(".")[0]
                        edges[mod].add(target)
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else package
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                if not (src == package or src.startswith(package + ".")):
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:  # a module: the edge is to it, whatever its name
                        edges[mod].add(sub)
                        aliases[a.asname or a.name] = sub
                    else:
                        edges[mod].add(src)
                        if a.name.startswith("_") and not a.name.startswith("__") and src != mod:
                            private.append(f"{mod}: from {src} import {a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")):
                owner = aliases[node.value.id]
                if f"{owner}.{node.attr}" not in mods and owner != mod:
                    private.append(f"{mod}: {node.value.id}.{node.attr} (a private name of {owner})")
        edges[mod].discard(mod)
    return edges, private


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The import cycles (each as the list of modules on it), found by depth-first search."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def layer_of(mod: str, layers=LAYERS) -> int:
    for i, (_, patterns) in enumerate(layers):
        if any(fnmatch.fnmatchcase(mod, p) for p in patterns):
            return i
    raise KeyError(mod)


def upward(edges: Dict[str, Set[str]], layers=LAYERS) -> List[str]:
    return [f"{a} ({layers[layer_of(a, layers)][0]}) imports {b} ({layers[layer_of(b, layers)][0]})"
            for a in sorted(edges) for b in sorted(edges[a]) if layer_of(b, layers) > layer_of(a, layers)]


# --------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph():
    return imports(PACKAGE_DIR, "pyvae")


def test_every_module_has_a_layer(graph):
    edges, _ = graph
    missing = []
    for m in edges:
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"modules without a layer in LAYERS: {missing}"


def test_no_import_cycles(graph):
    assert cycles(graph[0]) == []


def test_no_private_names_across_modules(graph):
    assert graph[1] == []


def test_imports_point_down(graph):
    assert upward(graph[0]) == []


def test_library_imports_no_application_module(graph):
    edges, _ = graph
    app = {m for m in edges if LAYERS[layer_of(m)][0] not in LIBRARY}
    lib = [m for m in edges if LAYERS[layer_of(m)][0] in LIBRARY]
    bad = [f"{m} -> {n}" for m in lib for n in edges[m] if n in app]
    assert not bad


def test_compiled_core_has_at_most_two_importers(graph):
    edges, _ = graph
    importers = sorted(m for m, e in edges.items() if "pyvae._C" in e)
    assert importers and len(importers) <= 2, importers
    assert "pyvae._gate" in importers


# ------------------------------------------------------------------------------ the checker itself
def _write(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_each_fault(tmp_path):
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "",
        "low.py": "def f():\n    from . import high  # upward, inside a function\n",
        "high.py": "from .low import f, _hidden\nimport pkg.low as lo\nx = lo._secret\n",
        "sub/__init__.py": "from .a import g\n",
        "sub/a.py": "from ..sub import b\ndef g():\n    pass\n",
        "sub/b.py": "from . import a\n",
    })
    layers = [("low", ["pkg.low", "pkg.sub", "pkg.sub.*"]), ("high", ["pkg", "pkg.high"])]
    edges, private = imports(root, "pkg")
    assert edges["pkg.high"] == {"pkg.low"}
    assert "pkg.high" in edges["pkg.low"]
    assert sorted(private) == ["pkg.high: from pkg.low import _hidden", "pkg.high: lo._secret (a private name of pkg.low)"]
    found = {tuple(sorted(set(c))) for c in cycles(edges)}
    assert ("pkg.high", "pkg.low") in found and ("pkg.sub.a", "pkg.sub.b") in found
    assert upward(edges, layers) == ["pkg.low (low) imports pkg.high (high)"]


def test_public_submodules_reachable_from_a_bare_import(tmp_path):
    # ``import pyvae; pyvae.nn.FusedLinear(...)`` is how the docs spell the modules; before, every submodule
    # but the op library raised AttributeError until imported by name. The bare import must stay cheap:
    # it loads none of them (checked in a fresh interpreter, where nothing else has imported them).
    import subprocess
    import sys

    code = ("import sys, pyvae\n"
            "heavy = sorted(m for m in ('pyvae.nn', 'pyvae.models', 'pyvae.train', 'pyvae.data', 'pyvae.runs') "
            "if m in sys.modules)\n"
            "assert not heavy, heavy\n"
            "assert pyvae.nn.FusedLinear.__module__ == 'pyvae.nn'\n"
            "assert pyvae.train.train.__module__ == 'pyvae.train'\n"
            "assert pyvae.VAE is pyvae.models.VAE\n"
            "assert {'nn', 'train', 'VAE', 'inference'} <= set(dir(pyvae))\n"
            "try:\n"
            "    pyvae.benchmarks_typo\n"
            "except AttributeError as e:\n"
            "    assert 'benchmarks_typo' in str(e)\n"
            "else:\n"
            "    raise AssertionError('no AttributeError')\n"
            "print('ok')\n")
    # (run outside the checkout: there the source tree's pyvae/, with no compiled _C, would shadow the install)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
