"""The package's shape, checked: the import graph between its modules (no cycle), the longest exported notebook cell
(at most 60 lines), and no module reading another module's private (`_name`) members.

    python tools/architecture.py          # prints the three reports; exit 1 if any check fails
"""
import ast, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG, NBS, MAX_CELL = ROOT/'meloformer', ROOT/'nbs', 60

def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PKG.glob('*.py')) if not p.stem.startswith('_')}

def imports(tree: ast.Module) -> dict[str, set[str]]:
    "Package modules imported at module level or inside functions, with the names taken from each."
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.setdefault(node.module.split('.')[0], set()).update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('meloformer.'):
            out.setdefault(node.module.split('.')[1], set()).update(a.name for a in node.names)
    return out

def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}
    def visit(n, path):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1: found.append(path[path.index(m):] + [m])
            elif m not in state: visit(m, path + [m])
        state[n] = 2
    for n in sorted(graph): 
        if n not in state: visit(n, [n])
    return found

def private_reads(mods: dict[str, ast.Module]) -> list[str]:
    "`from .x import _y`, and `x._y` where `x` names another package module or an object imported from one."
    bad = []
    for name, tree in mods.items():
        for mod, names in imports(tree).items():
            bad += [f"{name}: from .{mod} import {n}" for n in sorted(names) if n.startswith('_') and not n.startswith('__')]
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 for a in n.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith('_') and not node.attr.startswith('__')
                    and isinstance(node.value, ast.Name) and node.value.id in aliases and node.value.id in mods):
                bad.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
        # an object's private attribute that another module defines (`self._y = ...` there), read here off anything but self
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith('_') and not node.attr.startswith('__')
                    and not (isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls'))
                    and node.attr in defined_elsewhere(mods, name)):
                bad.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return bad

def defined_elsewhere(mods: dict[str, ast.Module], here: str) -> set[str]:
    "Private attribute names assigned on `self` in modules other than `here`."
    return {t.attr for n, tree in mods.items() if n != here for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) for t in ast.walk(t)
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == 'self' and t.attr.startswith('_')
            and not t.attr.startswith('__')}

def export_cells() -> list[tuple[int, str, str]]:
    "(lines, notebook, cell id) of every exported cell."
    out = []
    for nb in sorted(NBS.glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            s = ''.join(c['source'])
            if c['cell_type'] == 'code' and any(l.strip().replace(' ', '') in ('#|export', '#|exports') for l in s.splitlines()[:3]):
                out.append((len(s.splitlines()), nb.name, c.get('id', '?')))
    return out

def main() -> int:
    mods = modules()
    graph = {n: set(imports(t)) - {n} for n, t in mods.items()}
    print("import graph (module -> package modules it imports):")
    for n in sorted(graph): print(f"  {n:10s} -> {', '.join(sorted(graph[n])) or '-'}")
    cyc = cycles(graph)
    print(f"cycles: {cyc or 'none'}")
    cells = export_cells()
    longest = max(cells)
    over = [c for c in cells if c[0] > MAX_CELL]
    print(f"export cells: {len(cells)}, longest {longest[0]} lines ({longest[1]} {longest[2]}); over {MAX_CELL}: {over or 'none'}")
    bad = private_reads(mods)
    print(f"private members read across modules: {bad or 'none'}")
    return 1 if cyc or over or bad else 0

if __name__ == '__main__': sys.exit(main())
