"""Structure numbers of the xent package: private names imported across modules, import cycles, the
longest functions and how many signatures repeat each common option.

    python benchmarks/code_audit.py [SRC]      # SRC: the folder holding xent/ (default: src)

Private name: a name starting with one underscore, imported from another module (``from m import _x``)
or read off an imported xent module (``m._x``); a private *module* (``from . import _validate``) is the
package's layout, not a private name. Cycles: among module-level imports inside the package (imports
inside functions are deferred and listed apart). Package cycles: a subpackage importing a module that
imports the subpackage back ("imports upward").
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

OPTIONS = ("ignore_index", "softcap", "num_items", "reduction", "token_weights")


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((src / "xent").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))
    return target or ""


def main(argv=None):
    src = Path((argv or sys.argv[1:] or ["src"])[0])
    mods = modules(src)
    private, edges, deferred = [], defaultdict(set), []
    lengths, option_count = [], defaultdict(int)
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        aliases = {}  # local name -> xent module it names
        top_level = {id(n) for n in tree.body}
        top_level |= {id(n) for s in tree.body if isinstance(s, (ast.If, ast.Try)) for n in ast.walk(s)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = resolve(name, is_pkg, node.level, node.module)
                if not base.startswith("xent"):
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    target = full if full in mods else base
                    if full in mods:
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{name}: from {base} import {a.name}")
                    if target != name and id(node) in top_level:
                        edges[name].add(target)
                    elif target != name:
                        deferred.append((name, target))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("xent") and a.name in mods:
                        aliases[(a.asname or a.name).split(".")[0]] = a.asname and a.name or "xent"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
                args = node.args
                names = {a.arg for a in args.args + args.kwonlyargs + args.posonlyargs}
                for opt in OPTIONS:
                    option_count[opt] += opt in names
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != name
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and f"{aliases[node.value.id]}.{node.attr}" not in mods):
                private.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    # cycles among modules (Tarjan's strongly connected components)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in mods:
                continue
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
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for m in mods:
        if m not in index:
            visit(m)

    def reaches(start):
        """Modules reachable from start over module-level imports, not through the root package."""
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for w in edges.get(m, ()):
                if w in mods and w != "xent" and w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    def package(m):
        return m.rsplit(".", 1)[0] if mods[m].name != "__init__.py" else m

    upward = set()
    for a, b in [(a, b) for a, bs in edges.items() for b in bs] + deferred:
        pkg = package(a)
        if pkg != "xent" and b in mods and not b.startswith(pkg + ".") and b != pkg:
            if any(r == pkg or r.startswith(pkg + ".") for r in reaches(b)):
                upward.add(f"{a} -> {b}")
    upward = sorted(upward)
    # cycles again with the imports inside functions counted
    all_edges = defaultdict(set, {k: set(v) for k, v in edges.items()})
    for a, b in deferred:
        all_edges[a].add(b)
    module_sccs = sccs
    edges, index, low, stack, on, sccs, counter[0] = all_edges, {}, {}, [], set(), [], 0
    for m in mods:
        if m not in index:
            visit(m)
    deferred_sccs = [c for c in sccs if "xent" not in c]
    sccs = module_sccs
    print(f"private names imported across modules: {len(private)}")
    for p in private:
        print(f"  {p}")
    print(f"module import cycles (module-level imports): {len(sccs)}")
    for c in sccs:
        print("  " + " <-> ".join(c))
    print(f"cycles counting imports inside functions too (the root package left out): {len(deferred_sccs)}")
    for c in deferred_sccs:
        print("  " + " <-> ".join(c))
    print(f"imports upward (a subpackage importing a module that imports it back): {len(upward)}")
    for u in upward:
        print(f"  {u}")
    print("longest functions (lines):")
    for n, f in sorted(lengths, reverse=True)[:6]:
        print(f"  {n:4d} {f}")
    print("signatures naming each option: " + ", ".join(f"{o} {option_count[o]}" for o in OPTIONS))


if __name__ == "__main__":
    main()
