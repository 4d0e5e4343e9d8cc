"""The package's layout rules, checked (run by scripts/test.sh; exits 1 with one line per breach).

mrrm is laid out along the data path, in layers; a module imports only from its own layer and the
layers below it (an "upward" import is a breach), and no group of modules imports itself round
(an import circle is a breach, imports inside functions included):

    core      mrrm.errors, mrrm.common, mrrm._io, mrrm.integrity, mrrm._args
    kernels   mrrm.kernels.*   (the repository's top-level kernels/ folder)
    ops       mrrm.ops.*
    data      mrrm.data.*
    model     mrrm.model.*
    jobs      mrrm.train.*, mrrm.eval.*, mrrm.rl.*   (none imports another job)
    cli       mrrm.cli.*
    entry     mrrm (the package), mrrm.__main__ and the command entry points kept at their old paths

Also a breach: a module of mrrm/ that is in none of these (outside its subpackage), an import inside a
function without a comment on its line or the line above saying why (an optional dependency, or what
the lazy import saves), a test file outside the tests/ folder of its layer (tests/core, tests/ops, ...,
tests/cli mirror the package), and a README.md over README_MAX_LINES lines.

    python scripts/check_layout.py
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

CORE = {"mrrm.errors", "mrrm.common", "mrrm._io", "mrrm.integrity", "mrrm._args"}
ENTRY = {"mrrm", "mrrm.__main__", "mrrm.score", "mrrm.serve", "mrrm.grpo", "mrrm.prefgraph", "mrrm.flops",
         "mrrm.demo", "mrrm.tour"}
TEST_FOLDERS = ("core", "ops", "data", "model", "train", "eval", "rl", "cli")  # tests/<folder>/ mirrors mrrm
TESTS_AT_ROOT = ("test_docs.py",)  # about the repository (README, docs/), not a module
LAYERS = {"core": 0, "kernels": 1, "ops": 2, "data": 3, "model": 4, "train": 5, "eval": 5, "rl": 5, "cli": 6,
          "entry": 7}


def modules() -> dict[str, Path]:
    """Every module of the package: mrrm/ and the top-level kernels/ (as mrrm.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "mrrm", "mrrm"), (ROOT / "kernels", "mrrm.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def layer_of(name: str) -> str | None:
    if name in ENTRY:
        return "entry"
    if name in CORE:
        return "core"
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS and parts[1] not in ("core", "entry") and len(parts) > 2 or \
            len(parts) == 2 and parts[1] in ("ops", "kernels", "data", "model", "train", "eval", "rl", "cli"):
        return parts[1]
    return None


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool, str]]:
    """(imported mrrm module, line, inside a function, why) for each import of an mrrm module."""
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []

    def target(mod: str | None, level: int, alias: str | None) -> str | None:
        if level:
            base = package.split(".")
            base = base[:len(base) - level + 1]
            mod = ".".join(base + ([mod] if mod else []))
        if not mod or not (mod == "mrrm" or mod.startswith("mrrm.")):
            return None
        if alias and f"{mod}.{alias}" in known:
            return f"{mod}.{alias}"
        while mod not in known and "." in mod:
            mod = mod.rsplit(".", 1)[0]
        return mod

    def why(lineno: int) -> str:
        here = lines[lineno - 1]
        above = lines[lineno - 2].strip() if lineno >= 2 else ""
        if "#" in here:
            return here.split("#", 1)[1].strip()
        return above[1:].strip() if above.startswith("#") else ""

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    t = target(a.name, 0, None)
                    if t:
                        out.append((t, child.lineno, in_function, why(child.lineno)))
            elif isinstance(child, ast.ImportFrom):
                for a in child.names:
                    if child.module == "mrrm" and a.name.startswith("__"):  # the package's metadata (__version__)
                        continue
                    t = target(child.module, child.level, a.name)
                    if t:
                        out.append((t, child.lineno, in_function, why(child.lineno)))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            visit(child, inner)

    visit(tree, False)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def check() -> list[str]:
    mods = modules()
    known = set(mods)
    problems = []
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        layer = layer_of(name)
        if layer is None:
            problems.append(f"{path.relative_to(ROOT)}: module {name} is in no subpackage of the layout")
            continue
        for dep, line, in_function, reason in imports(name, path, known):
            if dep == name or dep == "mrrm" and layer != "entry":
                if dep == "mrrm" and name != "mrrm":
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports the package mrrm itself "
                                    "(import the module that defines the name)")
                continue
            graph.setdefault(name, set()).add(dep)
            dep_layer = layer_of(dep)
            if dep_layer is None:
                continue
            if layer != "entry" and LAYERS[dep_layer] > LAYERS[layer]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: upward import: {name} ({layer}) imports {dep} "
                                f"({dep_layer})")
            elif LAYERS[dep_layer] == LAYERS[layer] == 5 and dep_layer != layer:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name} ({layer}) imports another job's "
                                f"module {dep} ({dep_layer})")
            if in_function and not reason and layer != "entry":
                problems.append(f"{path.relative_to(ROOT)}:{line}: import of {dep} inside a function with no "
                                "comment saying why it is not at the top of the file")
    for comp in cycles(graph):
        problems.append("import circle: " + " <-> ".join(comp))
    for test in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = test.relative_to(ROOT / "tests")
        if rel.parts[0] == "fixtures":
            continue
        if len(rel.parts) == 1 and rel.name not in TESTS_AT_ROOT or len(rel.parts) > 1 and rel.parts[0] not in TEST_FOLDERS:
            problems.append(f"tests/{rel}: tests mirror the package: put it in tests/<{'|'.join(TEST_FOLDERS)}>/")
    readme = ROOT / "README.md"
    n = len(readme.read_text().splitlines())
    if n > README_MAX_LINES:
        problems.append(f"README.md: {n} lines, over the {README_MAX_LINES} of a landing page (move the manual to docs/)")
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    print(f"check_layout: {len(problems)} problem(s)" if problems else "check_layout: ok", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
