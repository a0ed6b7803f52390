"""The package's imports, read from the source: three layers that import one way, no cycle.

Layers and, inside the application, the order of its packages (a module imports only from its own
package or from packages of a lower rank):

    0  fastsamclip.kernels                     ops: torch and triton only
  0.1  fastsamclip.logs                        how log messages look and where they go
 0.25  fastsamclip.errors                      the errors a person can act on
  0.5  fastsamclip.files                       safe file writes (their errors are the person's)
    1  fastsamclip.transforms                  image geometry and pixel statistics
    2  fastsamclip.modeling                    the models, their configs and builders
    3  fastsamclip.checkpoint                  the merged checkpoint format
    4  fastsamclip.data, fastsamclip.draw      readers, prompts, streams, sample data; pictures
       fastsamclip.open_clip_compat            open_clip's interface on a merged checkpoint
    5  fastsamclip.train, fastsamclip.predictor
    6  fastsamclip.eval, fastsamclip.export, fastsamclip.serve
  6.5  fastsamclip.miniature                   the miniature world, its teachers, the recipe on them
 6.75  fastsamclip.demo                        the README's main job, on the miniature world
    7  fastsamclip.cli, fastsamclip.bench      the commands and the benchmarks, on the public API

Also: no import of the package's own modules inside a function (an ``import`` statement or
``importlib.import_module``) but at the declared lazy points (``LAZY``), and the benchmarks use only
the public API (``fastsamclip.kernels``' top-level names, no ``_private`` names anywhere).

The lazy points: the command line's dispatch imports the module of the one command that runs, so
that parsing (and every ``--help``) costs no torch, open_clip or segment_anything; the benchmark
command imports the one benchmark it runs; the package and ``fastsamclip.train`` import their
names on first use. Each may import only below its own prefix, and the modules the command line
imports before it dispatches may not reach a heavy package at all (``PARSER_MODULES``).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where each installed package's sources are (setup.py's package_dir).
SOURCES = {"fastsamclip": "fastsamclip", "fastsamclip.kernels": "kernels", "fastsamclip.bench": "bench"}
RANKS = {
    "fastsamclip": -1,  # the package itself: its version, nothing else
    "fastsamclip.kernels": 0, "fastsamclip.logs": 0.1,
    "fastsamclip.errors": 0.25, "fastsamclip.files": 0.5,
    "fastsamclip.transforms": 1,
    "fastsamclip.modeling": 2,
    "fastsamclip.checkpoint": 3,
    "fastsamclip.data": 4, "fastsamclip.draw": 4, "fastsamclip.open_clip_compat": 4,
    "fastsamclip.train": 5, "fastsamclip.predictor": 5,
    "fastsamclip.eval": 6, "fastsamclip.export": 6, "fastsamclip.serve": 6,
    "fastsamclip.miniature": 6.5, "fastsamclip.demo": 6.75,
    "fastsamclip.cli": 7, "fastsamclip.bench": 7,
    "fastsamclip.__main__": 8,
}

# (module, function) -> the prefix of what it may import lazily (importlib.import_module).
LAZY = {
    ("fastsamclip.cli", "load_command"): "fastsamclip.cli.",  # the command that runs, once parsed
    ("fastsamclip.cli.bench", "cmd_bench"): "fastsamclip.bench.",  # the benchmark that runs
    ("fastsamclip", "__getattr__"): "fastsamclip.",  # subpackages on first use
    ("fastsamclip.train", "__getattr__"): "fastsamclip.train.",  # names on first use
}
# What the command line imports before it dispatches (the parser, the logging, the errors), and
# the packages none of them may reach through the imports at their top (nor through the
# ``__init__`` of a package they import from).
PARSER_MODULES = ("fastsamclip.cli", "fastsamclip.cli.parsers")
HEAVY = ("torch", "triton", "torchvision", "open_clip", "segment_anything", "numpy", "PIL", "litserve")


@dataclass
class Import:
    module: str  # the importing module
    target: str  # the imported module (for `from a import b`: a.b if that is a module, else a)
    base: str  # the module named in the statement (`a` in `from a import b`)
    names: Tuple[str, ...]  # names taken with `from ... import`
    line: int
    in_function: Optional[str]  # the enclosing function's name, None at module level
    lazy: bool = False  # importlib.import_module(...) (target: the literal prefix of its argument)


def modules(sources: Dict[str, str], root: str) -> Dict[str, str]:
    """module name -> file, for every .py file of the packages."""
    out = {}
    for pkg, folder in sources.items():
        base = os.path.join(root, folder)
        for d, _, files in os.walk(base):
            if "__pycache__" in d or os.path.basename(d) in ("results", "csrc", "lib"):
                continue
            rel = os.path.relpath(d, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for f in files:
                if f.endswith(".py"):
                    name = ".".join([pkg, *parts] + ([] if f == "__init__.py" else [f[:-3]]))
                    out[name] = os.path.join(d, f)
    return out


def _resolve(module: str, is_pkg: bool, level: int, target: Optional[str]) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _literal_prefix(arg: ast.expr, module: str) -> Optional[str]:
    """The constant start of an import_module argument ("fastsamclip.cli." of
    f"fastsamclip.cli.{name}", ``__name__`` read as the module's name), or None."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if not isinstance(arg, ast.JoinedStr):
        return None
    prefix = ""
    for part in arg.values:
        if isinstance(part, ast.Constant):
            prefix += part.value
        elif isinstance(part.value, ast.Name) and part.value.id == "__name__":
            prefix += module
        else:
            break
    return prefix


def imports(mods: Dict[str, str]) -> List[Import]:
    out = []
    for name, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        is_pkg = path.endswith("__init__.py")
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
        inner = {id(n): getattr(f, "name", "<lambda>") for f in funcs for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            nested = inner.get(id(node))
            if isinstance(node, ast.Import):
                for a in node.names:
                    out.append(Import(name, a.name, a.name, (), node.lineno, nested))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_pkg, node.level, node.module) if node.level else node.module
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    target = sub if sub in mods else base
                    out.append(Import(name, target, base, (a.name,), node.lineno, nested))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                  and node.func.attr == "import_module"):
                target = _literal_prefix(node.args[0], name) or "?"
                out.append(Import(name, target, target, (), node.lineno, nested, lazy=True))
    return out


def rank(module: str) -> Optional[Tuple[str, int]]:
    best = max((p for p in RANKS if module == p or (p != "fastsamclip" and module.startswith(p + "."))),
               key=len, default=None)
    return None if best is None else (best, RANKS[best])


def violations(mods: Dict[str, str], imps: List[Import]) -> List[str]:
    bad = []
    for i in imps:
        if not (i.target == "fastsamclip" or i.target.startswith("fastsamclip.")):
            continue
        where = f"{i.module}:{i.line} imports {i.target}"
        allowed = LAZY.get((i.module, i.in_function))
        if i.in_function and not (i.lazy and allowed and i.target.startswith(allowed)):
            bad.append(f"{where} inside a function (imports of the package's own modules go at the top"
                       + (f"; {i.in_function} may import lazily only below {allowed})" if allowed else
                          ", but at the lazy points: LAZY)"))
        if i.lazy:
            continue  # a prefix, not a module: its layer is LAZY's
        src, dst = rank(i.module), rank(i.target)
        if src is None or dst is None:
            bad.append(f"{where}: a module outside the declared layers")
            continue
        if dst[1] > src[1] or (dst[1] == src[1] and dst[0] != src[0]):
            bad.append(f"{where}: {src[0]} (rank {src[1]}) may not import {dst[0]} (rank {dst[1]})")
        if src[0] == "fastsamclip.bench":
            if i.base.startswith("fastsamclip.kernels."):
                bad.append(f"{where}: benchmarks use fastsamclip.kernels' public names, not its modules")
            if any(n.startswith("_") for n in i.names):
                bad.append(f"{where}: benchmarks use the public API, not {i.names}")
    return bad


def cycles(mods: Dict[str, str], imps: List[Import]) -> List[List[str]]:
    """Strongly connected components (Tarjan) of the module-level import graph with a cycle."""
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for i in imps:
        if not i.in_function and not i.lazy and i.target in graph and i.target != i.module:
            graph[i.module].add(i.target)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def heavy_reach(mods: Dict[str, str], imps: List[Import], start=PARSER_MODULES, heavy=HEAVY) -> List[str]:
    """The chains by which ``start`` reaches a ``heavy`` package through module-level imports
    (importing ``a.b.c`` runs ``a`` and ``a.b`` first)."""
    top: Dict[str, List[str]] = {m: [] for m in mods}
    for i in imps:
        if not i.in_function and not i.lazy:
            top[i.module].append(i.target)
    chains, seen, todo = [], set(), [(m, (m,)) for m in start]
    while todo:
        module, chain = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        for target in top.get(module, []) + [".".join(parts[:k]) for k in range(1, len(parts))]:
            if target.split(".")[0] in heavy:
                chains.append(" -> ".join(chain + (target,)))
            elif target in mods:
                todo.append((target, chain + (target,)))
    return chains


def check(sources: Dict[str, str], root: str) -> List[str]:
    mods = modules(sources, root)
    imps = imports(mods)
    return (violations(mods, imps) + [f"import cycle: {' -> '.join(c)}" for c in cycles(mods, imps)]
            + [f"the command line's parser imports a heavy package: {c}" for c in heavy_reach(mods, imps)])


def test_the_package_imports_one_way_without_cycles():
    problems = check(SOURCES, REPO)
    assert not problems, "\n".join(problems)


def test_kernels_import_torch_and_triton_only():
    mods = modules({"fastsamclip.kernels": "kernels"}, REPO)
    assert len(mods) > 5
    third_party = {i.target.split(".")[0] for i in imports(mods)} - {"fastsamclip", "__future__"}
    stdlib = {"contextlib", "ctypes", "dataclasses", "functools", "logging", "math", "os", "typing", "hashlib",
              "json", "sys", "threading", "time", "warnings", "collections", "itertools", "platform", "pathlib",
              "shutil", "subprocess", "tempfile", "importlib", "re", "enum", "abc", "inspect", "io"}
    assert third_party - stdlib <= {"torch", "triton", "numpy", "packaging"}, third_party - stdlib


@pytest.mark.parametrize("case, expect", [
    ({"fastsamclip/modeling/a.py": "from fastsamclip.data import x\n"}, "rank 2) may not import fastsamclip.data"),
    ({"kernels/op.py": "import fastsamclip.transforms\n"}, "may not import fastsamclip.transforms"),
    ({"fastsamclip/data/a.py": "def f():\n    from fastsamclip.transforms import y\n"}, "inside a function"),
    ({"fastsamclip/train/a.py": "from fastsamclip.predictor import p\n"}, "may not import fastsamclip.predictor"),
    ({"fastsamclip/data/a.py": "from fastsamclip.data import b\n",
      "fastsamclip/data/b.py": "from fastsamclip.data import a\n"}, "import cycle"),
    ({"bench/b.py": "from fastsamclip.kernels.relpos_attention import _select\n"}, "not its modules"),
    ({"fastsamclip/zzz.py": "from fastsamclip.transforms import t\n"}, "outside the declared layers"),
    ({"fastsamclip/data/a.py": "import importlib\ndef f(n):\n    return importlib.import_module(f'fastsamclip.{n}')\n"},
     "inside a function"),
    ({"fastsamclip/cli/__init__.py": "import importlib\ndef load_command(n):\n"
                                     "    return importlib.import_module(f'fastsamclip.train.{n}')\n"},
     "load_command may import lazily only below fastsamclip.cli."),
    ({"fastsamclip/cli/parsers.py": "from fastsamclip.data.names import thing\n",
      "fastsamclip/data/names.py": "", "fastsamclip/data/__init__.py": "import torch\n"},
     "parser imports a heavy package: fastsamclip.cli.parsers -> fastsamclip.data.names -> fastsamclip.data -> torch"),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, case, expect):
    for rel, text in {"fastsamclip/__init__.py": "", "fastsamclip/transforms.py": "", "kernels/__init__.py": "",
                      "bench/__init__.py": "", "fastsamclip/data/__init__.py": "", **case}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    problems = check(SOURCES, str(tmp_path))
    assert any(expect in p for p in problems), problems


def test_no_module_grows_past_600_lines_without_saying_why():
    long = []
    for name, path in modules(SOURCES, REPO).items():
        text = open(path).read()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 650 and "lines" not in doc:
            long.append(f"{name}: {text.count(chr(10))} lines")
    assert not long, long
