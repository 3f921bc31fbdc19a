"Render README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed here)."
import argparse, re, sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"

def _directives(src):
    return {m.group(1).strip() for m in re.finditer(r'^#\|\s*([\w-]+)', src, flags=re.M)}

def render(nb_path=ROOT/'nbs'/'index.ipynb'):
    "Markdown for `nb_path`: markdown cells as they are, code cells as python blocks, text outputs as plain blocks."
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for cell in nb.cells:
        src = cell.source
        if cell.cell_type == 'markdown':
            # images live beside the notebooks: point the README's links into nbs/
            parts.append(re.sub(r'\]\((images/[^)]+)\)', r'](nbs/\1)', src.strip())); continue
        if cell.cell_type != 'code' or 'hide' in _directives(src): continue
        code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
        if code: parts.append(f"```python\n{code}\n```")
        for out in cell.get('outputs', []):
            text = out.get('text') or out.get('data', {}).get('text/markdown') or out.get('data', {}).get('text/plain')
            if not text: continue
            text = ''.join(text) if isinstance(text, list) else text
            md = out.get('data', {}).get('text/markdown')
            parts.append(text.strip() if md else f"```\n{text.rstrip()}\n```")
    return HEADER + '\n\n'.join(p for p in parts if p) + '\n'

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--check', action='store_true', help='exit 1 if README.md is not what the notebook renders to')
    args = ap.parse_args()
    text, readme = render(), ROOT/'README.md'
    if args.check:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is out of date: run `python tools/make_readme.py`')
        print('README.md in sync with nbs/index.ipynb')
    else:
        readme.write_text(text); print(f'wrote {readme}')
