"""The package's shape, checked: the import graph between its modules (no cycle), the longest exported notebook cell
(at most 60 lines), and no module reading another module's private (`_name`) members.

    python tools/architecture.py              # prints the three reports; exit 1 if any check fails
    python tools/architecture.py --self-test  # builds small packages with each violation; exit 1 if one is missed

Imports count in every form, at module level or inside functions: `from .x import y`, `from . import x`,
`from meloformer.x import y`, `from meloformer import x`, `import meloformer.x [as X]`. A private read is
`from .x import _y`; `X._y` where `X` names a package module (however imported, also `meloformer.x._y`); and
`obj._y` off anything but `self`/`cls` where `_y` is defined in another package module (a function or method,
`@patch` ones included, a class attribute, a module-level name, a `self._y = ...`) and not in this one.
"""
import ast, json, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG, NBS, MAX_CELL = ROOT/'meloformer', ROOT/'nbs', 60

def private(name: str) -> bool: return name.startswith('_') and not name.startswith('__') and name != '_'

def modules(pkg: Path = PKG) -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(pkg.glob('*.py')) if not p.stem.startswith('_')}

def _absolute(node: ast.ImportFrom, pkg: str) -> list[str] | None:
    "The dotted path below the package that a `from ... import` names ([] for the package itself), else None."
    if node.level == 1: return node.module.split('.') if node.module else []
    if node.level == 0 and node.module and node.module.split('.')[0] == pkg: return node.module.split('.')[1:]
    return None

def imports(tree: ast.Module, pkg: str, mods) -> dict[str, set[str]]:
    "Package modules imported (in any form, at module level or inside functions), with the names taken from each."
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (path := _absolute(node, pkg)) is not None:
            if path: out.setdefault(path[0], set()).update(a.name for a in node.names)
            else:   # from . import x / from meloformer import x: the names are modules
                for a in node.names:
                    if a.name in mods: out.setdefault(a.name, set())
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split('.')
                if parts[0] == pkg and len(parts) > 1: out.setdefault(parts[1], set())
    return out

def module_names(tree: ast.Module, pkg: str, mods) -> tuple[dict[str, str], set[str]]:
    "Local names bound to package modules ({name: module}), and local names bound to the package itself."
    alias, package = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _absolute(node, pkg) == []:
            for a in node.names:
                if a.name in mods: alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split('.')
                if parts[0] != pkg: continue
                if a.asname and len(parts) > 1: alias[a.asname] = parts[1]
                elif a.asname: package.add(a.asname)
                else: package.add(pkg)   # `import meloformer.x` binds `meloformer`
    return alias, package

def module_of(node: ast.AST, alias: dict[str, str], package: set[str], mods) -> str | None:
    "The package module an expression names (`T`, `meloformer.tokenizer`), else None."
    if isinstance(node, ast.Name): return alias.get(node.id)
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in package
            and node.attr in mods): return node.attr
    return None

def definitions(tree: ast.Module) -> set[str]:
    "Private names a module defines: functions and methods (`@patch` ones too), classes, module-level and class-body"
    " names, and attributes assigned on `self`/`cls`. Locals inside functions do not count."
    out = set()
    def targets(node):
        ts = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t for t0 in ts for t in ast.walk(t0)]
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(child.name); visit(child, isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
                continue
            if isinstance(child, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in targets(child):
                    if isinstance(t, ast.Name) and not in_function: out.add(t.id)
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ('self', 'cls'):
                        out.add(t.attr)
            visit(child, in_function)
    visit(tree, False)
    return {n for n in out if private(n)}

def private_reads(mods: dict[str, ast.Module], pkg: str = PKG.name) -> list[str]:
    "Every private member of one package module read from another (see the module docstring for the forms)."
    defs = {n: definitions(t) for n, t in mods.items()}
    bad = []
    for name, tree in mods.items():
        for mod, names in imports(tree, pkg, mods).items():
            if mod != name: bad += [f"{name}: imports {n} from {mod}" for n in sorted(names) if private(n)]
        alias, package = module_names(tree, pkg, mods)
        elsewhere = set().union(*(d for n, d in defs.items() if n != name)) - defs[name]
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)): continue
            owner = module_of(node.value, alias, package, mods)
            if owner is not None and owner != name:
                bad.append(f"{name}:{node.lineno}: {ast.unparse(node)} ({owner}'s private member)")
            elif (owner is None and node.attr in elsewhere
                    and not (isinstance(node.value, ast.Name) and node.value.id in ('self', 'cls'))):
                where = sorted(n for n, d in defs.items() if node.attr in d)
                bad.append(f"{name}:{node.lineno}: {ast.unparse(node)} (defined in {', '.join(where)})")
    return bad

def graph_of(mods: dict[str, ast.Module], pkg: str = PKG.name) -> dict[str, set[str]]:
    "module -> package modules it imports or reaches as `meloformer.x`."
    graph = {}
    for n, t in mods.items():
        g = set(imports(t, pkg, mods))
        alias, package = module_names(t, pkg, mods)
        g |= {m for node in ast.walk(t) if (m := module_of(node, {}, package, mods))}
        graph[n] = (g & set(mods)) - {n}
    return graph

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

def export_cells(nbs: Path = NBS) -> list[tuple[int, str, str]]:
    "(lines, notebook, cell id) of every exported cell."
    out = []
    for nb in sorted(nbs.glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            s = ''.join(c['source'])
            if c['cell_type'] == 'code' and any(l.strip().replace(' ', '') in ('#|export', '#|exports') for l in s.splitlines()[:3]):
                out.append((len(s.splitlines()), nb.name, c.get('id', '?')))
    return out

def check(pkg: Path = PKG, nbs: Path = NBS, out=print) -> set[str]:
    "Print the three reports for the package folder `pkg` and notebooks `nbs`; the checks that fail, of 'cycle', 'cell', 'private'."
    mods = modules(pkg)
    graph = graph_of(mods, pkg.name)
    out("import graph (module -> package modules it imports):")
    for n in sorted(graph): out(f"  {n:10s} -> {', '.join(sorted(graph[n])) or '-'}")
    cyc = cycles(graph)
    out(f"cycles: {cyc or 'none'}")
    cells = export_cells(nbs)
    over = [c for c in cells if c[0] > MAX_CELL]
    longest = f"longest {max(cells)[0]} lines ({max(cells)[1]} {max(cells)[2]})" if cells else "none"
    out(f"export cells: {len(cells)}, {longest}; over {MAX_CELL}: {over or 'none'}")
    bad = private_reads(mods, pkg.name)
    out(f"private members read across modules: {bad or 'none'}")
    return {k for k, v in (('cycle', cyc), ('cell', over), ('private', bad)) if v}

# Each case: files of a small package `pkg` (and optionally one notebook) that break exactly one rule, named first.
OWNER = "class Attention:\n    _scale = 2.0\n    def __init__(self): self._heads = 4\n    def _merge(self, y): return y\n" \
        "_TABLE = {}\ndef _helper(): return 1\ndef public(): return _helper()\n"
PATCHED = "from fastcore.basics import patch\nclass ShardDataset: pass\n" \
          "@patch\ndef _no_piece(self: ShardDataset) -> str: return 'none'\n"
SELF_TESTS = {
    ('private', 'method read'): {'a.py': OWNER, 'b.py': "from .a import Attention\ndef f(blk): return blk.attn._merge(1)\n"},
    ('private', '@patch method read'): {'a.py': PATCHED, 'b.py': "from .a import ShardDataset\ndef f(ds): return ds._no_piece()\n"},
    ('private', 'class attribute read'): {'a.py': OWNER, 'b.py': "def f(m): return m._scale\n"},
    ('private', 'self attribute read'): {'a.py': OWNER, 'b.py': "def f(m): return m._heads\n"},
    ('private', 'from .a import _x'): {'a.py': OWNER, 'b.py': "from .a import _helper\n"},
    ('private', 'from pkg.a import _x'): {'a.py': OWNER, 'b.py': "from pkg.a import _TABLE\n"},
    ('private', 'import pkg.a; pkg.a._x'): {'a.py': OWNER, 'b.py': "import pkg.a\ndef f(): return pkg.a._TABLE\n"},
    ('private', 'import pkg.a as A; A._x'): {'a.py': OWNER, 'b.py': "import pkg.a as A\ndef f(): return A._helper()\n"},
    ('private', 'from . import a as T'): {'a.py': OWNER, 'b.py': "from . import a as T\ndef f(): return T._TABLE\n"},
    ('private', 'from pkg import a'): {'a.py': OWNER, 'b.py': "from pkg import a\ndef f(): return a._helper()\n"},
    ('cycle', 'from . import'): {'a.py': "from . import b\n", 'b.py': "from .a import x\nx = 1\n"},
    ('cycle', 'import pkg.b'): {'a.py': "import pkg.b\n", 'b.py': "from .a import x\nx = 1\n"},
    ('cycle', 'from pkg import'): {'a.py': "from pkg import b\n", 'b.py': "from pkg.a import x\nx = 1\n"},
    ('cycle', 'in a function'): {'a.py': "def f():\n    from .b import g\n    return g()\n", 'b.py': "from .a import f\ndef g(): return 1\n"},
    ('cycle', 'three modules'): {'a.py': "from .b import y\nx = 1\n", 'b.py': "from .c import z\ny = 1\n", 'c.py': "from .a import x\nz = 1\n"},
    ('cell', 'export cell over 60'): {'a.py': "x = 1\n", 'nb.ipynb': json.dumps({'cells': [{'cell_type': 'code', 'id': 'c0',
        'source': ['#| export\n'] + ['x = 1\n'] * MAX_CELL}]})},
}
CLEAN = {   # private members used by their owner, public ones across modules, a same-named private of its own
    'a.py': OWNER,
    'b.py': "from . import a\nimport pkg.a as A\nfrom pkg import a as a2\nfrom .a import Attention, public\n"
            "class Mine:\n    def __init__(self): self._state = 0\n    def _merge(self, y): return y\n"
            "def f(blk, m): return a.public() + A.public() + a2.public() + blk._merge(1) + m._state + blk.__dict__.__len__()\n",
    'c.py': "import torch\ndef g(t): from .b import f; return torch.Tensor._make_subclass if t else f\n",
    'nb.ipynb': json.dumps({'cells': [{'cell_type': 'code', 'id': 'c0', 'source': ['#| export\n'] + ['x = 1\n'] * (MAX_CELL - 1)}]}),
}

def self_test() -> int:
    "Check that each case in SELF_TESTS fails its check (and only that one) and the clean package passes; 1 if not."
    failed = []
    for (rule, name), files in [*SELF_TESTS.items(), ((None, 'clean package'), CLEAN)]:
        with tempfile.TemporaryDirectory() as d:
            (pkg := Path(d)/'pkg').mkdir(); (nbs := Path(d)/'nbs').mkdir()
            for f, text in files.items(): ((nbs if f.endswith('.ipynb') else pkg)/f).write_text(text)
            lines = []
            fails = check(pkg, nbs, out=lines.append)
        ok = fails == ({rule} if rule else set())
        print(f"  {'ok  ' if ok else 'MISS'} {rule or 'none'}: {name}" + ('' if ok else ': ' + ' | '.join(lines)))
        if not ok: failed.append(name)
    print(f"self-test: {len(SELF_TESTS) + 1 - len(failed)} of {len(SELF_TESTS) + 1} cases as expected")
    return 1 if failed else 0

if __name__ == '__main__':
    args = sys.argv[1:]
    if args not in ([], ['--self-test']):
        print(f"architecture.py: unknown arguments {' '.join(args)} (use no argument or --self-test)", file=sys.stderr); sys.exit(2)
    sys.exit(self_test() if args else int(bool(check())))
