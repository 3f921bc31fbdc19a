"""The GPU path in one prepared check: the `gpu` notebook cells, training throughput, attention, memory, generation.

    python bench/gpu_check.py                        # on one CUDA device: every item in order, ~9 minutes at most
    python bench/gpu_check.py --items train memory   # some items only
    python bench/gpu_check.py --dry-run              # the same items through the same code on CPU, tiny sizes (CI)

Items, in order, each run in its own process with its own time budget (an item over its budget is cut and
reported as cut; the others still run):

1. `gpu_cells`: the `#| gpu` cells of the notebooks (flex forward + backward against the sdpa reference, a
   compiled bf16 training step of `small` at L = 8192), each with the definitions it needs from its notebook.
2. `train`: training throughput of `small` at L = 8192, batch 6, compiled, bf16, flex (bench/train.py's `Run`:
   the real `Trainer.train_step`): tokens/s, MFU (dense-equivalent and attended pairs), peak memory, recompiles.
3. `attention`: forward + backward of one layer's attention at L = 8192 and 24576: `museformer` flex vs dense
   causal flash attention (sdpa `is_causal`) vs the same mask densified (sdpa); block-mask build time per batch.
4. `memory`: `meloformer.memory`'s estimator against measured peaks (small and base, 2 lengths each, and the
   release batch), and the max-sequence-length finder measured.
5. `generate`: cached generation tokens/s of `small` at a 4k context, eager and with the one-token step compiled.

Each item writes `<out_dir>/<item>.md` (machine, GPU, driver, torch, date in its header; goals beside the
figures) and the run writes `<out_dir>/summary.md`. GPU results go to bench/results/gpu/. The exit status is
non-zero when an item fails, errors or is cut. `--dry-run` runs every item on CPU with tiny sizes and short
lengths (FlexAttention forward only: it has no CPU backward; training steps use the sdpa backend), writing the
same files to a temp folder: CI runs it so that a change that breaks the GPU check breaks CI.
"""
import argparse, ast, contextlib, datetime, importlib.util, io, json, logging, os, platform, re, signal, statistics
import subprocess, sys, symtable, tempfile, time, traceback, types
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / 'results' / 'gpu'
ITEMS = ['gpu_cells', 'train', 'attention', 'memory', 'generate']
# seconds per item: on the GPU (the whole at most 9 minutes, process start-up included), and in the dry run
# (a cut there fails CI; the dry run takes ~1 minute on 2 idle cores)
BUDGET_GPU = dict(gpu_cells=110, train=170, attention=70, memory=100, generate=60)
BUDGET_DRY = dict(gpu_cells=90, train=150, attention=90, memory=90, generate=90)
TOTAL_GPU, TOTAL_DRY = 540, 420
REHEARSE = False                       # --rehearse (dry run): run the gpu cells on CPU too
GOALS = dict(tokens_per_s=300_000, peak_gb=15.0, speedup_8192=1.5, speedup_24576=3.0, estimator_pct=20.0)

# what each item runs: GPU sizes, and the dry run's tiny stand-ins (same code paths)
CONFIG = dict(
    # workers 0: the demo corpus gives 7 batches of 6 x 8192 per epoch, and each new epoch would start new loader
    # workers inside a timed step; collating a batch in the main process takes ~1 ms
    gpu=dict(train=dict(size='small', L=8192, batch=6, warmup=3, steps=10, workers=0),
             attention=dict(lengths=(8192, 24576), heads=6, head_dim=64, dtype='bfloat16', repeats=(10, 5), build_batch=6),
             memory=dict(grid=[('small', 1, 4096), ('base', 1, 4096), ('small', 1, 16384), ('base', 1, 16384)],
                         finder=dict(size='small', batch_size=1, budget_gb=8.0, multiple=16384, max_len=131072),
                         after=[('small', 6, 8192)]),     # the release batch last: item `train` measures it compiled
             generate=dict(size='small', ctx=4096, warmup=32, steps=64, backend='inductor')),
    dry=dict(train=dict(size='tiny', L=256, batch=2, warmup=1, steps=2, workers=0),
             attention=dict(lengths=(128, 256), heads=2, head_dim=32, dtype='float32', repeats=(2, 2), build_batch=2),
             memory=dict(grid=[('tiny', 2, 512)],
                         finder=dict(size='tiny', batch_size=1, budget_gb=None, multiple=128, max_len=4096), after=[]),
             generate=dict(size='tiny', ctx=256, warmup=4, steps=8, backend='eager')))


# ---------------------------------------------------------------------------------------------- reports
def machine(device: str) -> str:
    "CPU, GPU, driver, CUDA, torch, Python and date: the header line of every result file."
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    gpu = 'none'
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    try:
        driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True,
                                text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError): driver = 'none'
    return (f"{cpu}, {os.cpu_count()} cores; GPU: {gpu}; driver {driver}, CUDA {torch.version.cuda or 'none'}; "
            f"torch {torch.__version__}, Python {platform.python_version()}; {datetime.datetime.now():%Y-%m-%d %H:%M}; device measured: {device}")


def md_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(r.get(c, '')) for c in cols) + ' |' for r in rows])


def goal(ok: bool | None, dry: bool) -> str:
    "The goal column: met / NOT met, or n/a in the dry run (CPU figures say nothing about a GPU)."
    return 'n/a (dry run)' if dry else '-' if ok is None else 'met' if ok else 'NOT met'


class Report:
    "One item's markdown file, rewritten atomically after every addition: a cut item keeps what it finished."
    def __init__(self, path: Path, title: str, dry: bool, device: str):
        self.path, self.parts = path, [f"# GPU check: {title}", '', machine(device) + '.', '',
                                       '**CPU dry run**: tiny sizes, short lengths; the figures check the code path, '
                                       'not the GPU goals.' if dry else 'One CUDA device; goals beside the figures.']
        self.write()

    def add(self, *lines: str):
        self.parts += ['', *lines]; self.write()
        print(*lines, sep='\n', flush=True)

    def rows(self, rows: list[dict]):
        "A table that grows row by row: the file always holds it whole; the console gets the newest row."
        table = md_table(rows)
        if rows and len(rows) > 1 and self.parts[-1].startswith('|'): self.parts[-1] = table
        else: self.parts += [table] if self.parts[-1] == '' else ['', table]
        self.write()
        print(table if len(rows) == 1 else table.splitlines()[-1], flush=True)

    def write(self):
        tmp = self.path.with_suffix('.md.tmp')
        tmp.write_text('\n'.join(self.parts) + '\n'); os.replace(tmp, self.path)


def load_bench(name: str):
    "A sibling benchmark script (bench/<name>.py) as a module, so its functions are reused, not copied."
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCH / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


class RecompileCounter:
    "Counts dynamo recompilations (its `recompiles` log) and keeps their reasons, without printing them."
    def __init__(self):
        import torch
        self.n, self.reasons = 0, []
        torch._logging.set_logs(recompiles=True)
        logging.getLogger('torch._dynamo.guards.__recompiles').addFilter(self.record)

    def record(self, rec) -> bool:
        self.n += 1
        why = next((l.strip() for l in rec.getMessage().splitlines() if l.strip().startswith('- ')), '?')
        self.reasons.append(why.split('#')[0].strip(' -') or why)     # the failed guard, without the source comment
        return False                                                  # counted here, not printed


def sync():
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()


def median_s(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup): fn()
    sync(); times = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- 1. gpu cells
def directives(src: str) -> tuple[set, dict]:
    "nbdev directives at the top of a cell: flags (`gpu`, `slow`, `export`, ...) and options (`eval: false`)."
    flags, opts = set(), {}
    for line in src.splitlines():
        m = re.match(r'\s*#\|\s*(.*)', line)
        if not m:
            if line.strip(): break
            continue
        d = m.group(1).strip()
        if ':' in d: k, v = d.split(':', 1); opts[k.strip()] = v.strip()
        else: flags.update(d.split())
    return flags, opts


def bound_and_free(src: str) -> tuple[set, set]:
    "Names a piece of module-level code binds, and the global names it reads (functions and classes included)."
    top = symtable.symtable(src, '<cell>', 'exec')
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    free = {s.get_name() for s in top.get_symbols() if s.is_referenced()}
    def walk(t):
        for c in t.get_children():
            free.update(s.get_name() for s in c.get_symbols() if s.is_global() and s.is_referenced())
            walk(c)
    walk(top)
    return bound, free - bound


def statements(src: str) -> list[str]:
    "Top-level statements of a cell's source, each with its decorators."
    tree, lines = ast.parse(src), src.splitlines()
    out = []
    for node in tree.body:
        decos = getattr(node, 'decorator_list', [])
        if decos: out.append('\n'.join(lines[min(d.lineno for d in decos) - 1:node.end_lineno]))
        else: out.append(ast.get_source_segment(src, node))
    return out


def gpu_plan(nb_path: Path, skip_flags=('slow',)) -> dict:
    """The `gpu` cells of a notebook and the statements of earlier cells that define what they read (found by
    name, recursively: imports, helper functions, sample files), in notebook order. Cells nbdev_test would skip
    (other flags, `eval: false`) are not used."""
    import builtins
    cells = json.loads(nb_path.read_text())['cells']
    code = [(i, ''.join(c['source'])) for i, c in enumerate(cells) if c['cell_type'] == 'code']
    gpu = [(i, s) for i, s in code if 'gpu' in directives(s)[0]]
    if not gpu: return dict(gpu=[], prereq=[], missing=set())
    first = gpu[0][0]
    defs = {}                                        # name -> (cell, statement index, source): the latest before the first gpu cell
    stmts = {}
    for i, s in code:
        flags, opts = directives(s)
        if i >= first or flags & set(skip_flags) or opts.get('eval', '').lower() == 'false': continue
        try: parts = statements(s)
        except SyntaxError: continue                # IPython magics: nothing a gpu cell can import from
        for j, st in enumerate(parts):
            b, f = bound_and_free(st)
            stmts[(i, j)] = (st, f)
            for name in b: defs[name] = (i, j)
    need, later_gpu_defs = set(), set()
    for i, s in gpu:
        b, f = bound_and_free(s)
        need |= f - later_gpu_defs; later_gpu_defs |= b
    chosen, todo, missing = set(), list(need), set()
    while todo:
        name = todo.pop()
        if name in defs:
            key = defs[name]
            if key not in chosen: chosen.add(key); todo += list(stmts[key][1])
        elif not hasattr(builtins, name) and name in need: missing.add(name)
    return dict(gpu=gpu, prereq=[(k, stmts[k][0]) for k in sorted(chosen)], missing=missing,
                gpu_defs=later_gpu_defs)


def unresolved(src: str, ns: dict, also: set) -> list[str]:
    "Global names (and attribute chains on them, e.g. `torch.cuda.max_memory_allocated`) a cell reads that do not exist."
    import builtins
    bound, free = bound_and_free(src)
    bad = [n for n in sorted(free) if n not in ns and n not in also and not hasattr(builtins, n)]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Attribute):
            chain, x = [], node
            while isinstance(x, ast.Attribute): chain.insert(0, x.attr); x = x.value
            if isinstance(x, ast.Name) and x.id in ns and x.id not in bound:
                obj = ns[x.id]
                for k, attr in enumerate(chain):
                    if not hasattr(obj, attr): bad.append('.'.join([x.id, *chain[:k + 1]])); break
                    obj = getattr(obj, attr)
    return sorted(set(bad))


def cpu_rehearsal(src: str) -> str:
    "A gpu cell for CPU: device 'cpu', `tiny` for the model sizes, lengths of 1024 or more cut to 256, no CUDA memory calls."
    src = re.sub(r"""(['"])cuda\1""", "'cpu'", src)
    src = re.sub(r"""(['"])(small|base|large|xlarge)\1""", "'tiny'", src)
    src = re.sub(r'(?<![\w.])\d{4,}(?![\w.])', lambda m: '256' if int(m.group()) >= 1024 else m.group(), src)
    return re.sub(r'torch\.cuda\.(synchronize|max_memory_allocated|max_memory_reserved|reset_peak_memory_stats|empty_cache)\(\)', '0', src)


FLEX_NO_CPU_BACKWARD = 'FlexAttention does not support backward on CPU'


def item_gpu_cells(cfg, rep: Report, dry: bool) -> bool:
    import torch
    work = Path(tempfile.mkdtemp(prefix='meloformer-gpu-cells-'))
    os.chdir(work)                                   # notebooks write their sample files under ./_tmp, as nbdev_test does from nbs/
    rows, ok = [], True
    notebooks = sorted((REPO / 'nbs').glob('*.ipynb'))
    plans = {nb: gpu_plan(nb) for nb in notebooks}
    plans = {nb: p for nb, p in plans.items() if p['gpu']}
    if not plans:
        rep.add('**FAIL**: no `#| gpu` cell in nbs/*.ipynb: nothing to check.'); return False
    rep.add(f"`#| gpu` cells of {', '.join(nb.name for nb in plans)}, each notebook in a fresh namespace with the definitions "
            "its gpu cells read (found by name in earlier cells, executed in notebook order)" +
            (". Dry run: the definitions run, each gpu cell is compiled and every global name and attribute chain it reads is "
             "resolved; the cells themselves need CUDA (FlexAttention has no CPU backward)" + (
             "; `--rehearse`: each also runs on CPU (device 'cpu', `tiny`, lengths 256) up to its first flex backward." if REHEARSE
             else ", so they do not run (`--rehearse` runs them on CPU up to their first flex backward, ~1-2 minutes)." ) if dry else '.'))
    for nb, plan in plans.items():
        # a real module in sys.modules, as IPython's namespace is: dynamo's guards look globals up through the module
        module = types.ModuleType('gpu_cells_' + re.sub(r'\W', '_', nb.stem))
        sys.modules[module.__name__] = module
        ns = module.__dict__
        t0 = time.perf_counter()
        try:
            for (i, j), st in plan['prereq']: exec(compile(st, f'{nb.name}:cell{i}', 'exec'), ns)
            prereq = dict(notebook=nb.name, cell='definitions the gpu cells read', status='ok')
        except Exception as e:
            prereq = dict(notebook=nb.name, cell='definitions the gpu cells read', status=f'FAIL: {type(e).__name__}: {str(e)[:200]}')
            traceback.print_exc(); ok = False
        prereq.update(seconds=f'{time.perf_counter() - t0:.1f}', detail=f"{len(plan['prereq'])} statements")
        if plan['missing']: prereq['detail'] += f"; not defined before the gpu cells: {', '.join(sorted(plan['missing']))}"
        rows.append(prereq); rep.rows(rows)
        for i, src in plan['gpu']:
            first_line = next((l.strip() for l in src.splitlines() if l.strip() and not l.strip().startswith('#|')), '')[:110]
            row = dict(notebook=nb.name, cell=f'{i}: {first_line}')
            t0 = time.perf_counter()
            if dry:
                try:
                    compile(src, f'{nb.name}:cell{i}', 'exec')
                    bad = unresolved(src, ns, plan['gpu_defs'])
                    row['status'] = f"FAIL: unresolved {', '.join(bad)}" if bad else 'names resolve (not run: CUDA)'
                except SyntaxError as e: bad, row['status'] = True, f'FAIL: {e}'
                if REHEARSE and not bad:
                    try:
                        exec(compile(cpu_rehearsal(src), f'{nb.name}:cell{i} (CPU rehearsal)', 'exec'), ns)
                        row['status'] = 'rehearsed on CPU: ran'
                    except Exception as e:
                        if isinstance(e, NotImplementedError) and FLEX_NO_CPU_BACKWARD in str(e):
                            row['status'] = 'rehearsed on CPU up to the flex backward'
                        else:
                            bad, row['status'] = True, f'FAIL (CPU rehearsal): {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ""}'
                            traceback.print_exc()
                ok &= not bad
                row.update(seconds=f'{time.perf_counter() - t0:.1f}', detail='')
            else:
                out = io.StringIO()
                torch.cuda.reset_peak_memory_stats()
                try:
                    with contextlib.redirect_stdout(out): exec(compile(src, f'{nb.name}:cell{i}', 'exec'), ns)
                    sync(); row['status'] = 'pass'
                except Exception as e:
                    row['status'] = f'FAIL: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ""}'
                    traceback.print_exc(); ok = False
                printed = ' / '.join(l.strip() for l in out.getvalue().splitlines() if l.strip())
                row.update(seconds=f'{time.perf_counter() - t0:.1f}', peak_GiB=f'{torch.cuda.max_memory_allocated() / 2**30:.2f}',
                           detail=printed[-400:])
            rows.append(row); rep.rows(rows)
    return ok


# ---------------------------------------------------------------------------------------------- 2. training throughput
def item_train(cfg, rep: Report, dry: bool) -> bool:
    "bench/train.py's `Run` (a real `Trainer`, compiled) at the release's size, length and batch; its loop, with memory read out."
    import torch
    bt = load_bench('train')
    c = cfg['train']
    device = torch.device('cpu' if dry else 'cuda')
    counter = RecompileCounter()
    args = argparse.Namespace(device=device.type, num_workers=c['workers'], compile=True)
    peak = lambda: bt.matmul_peak(device, 512 if dry else 8192, torch.float32 if dry else torch.bfloat16, repeats=3, warmup=1)['median']
    rep.add(f"`{c['size']}` at L = {c['L']}, batch {c['batch']}, `museformer` masks, `torch.compile` through `Trainer` "
            f"({'sdpa, fp32 (CPU: no flex backward)' if dry else 'flex, bf16 autocast'}), rows of the embedded demo corpus; "
            f"{c['warmup']} warm-up step(s) (the first compiles), then {c['steps']} timed steps with bench/train.py's "
            f"matmul anchor ({'fp32 512' if dry else 'bf16 8192'}) between them. Memory: `torch.cuda.max_memory_allocated` / "
            "`max_memory_reserved` over warm-up and timed steps.", '', '## Steps', '')
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = bt.Run(c['size'], c['L'], 'museformer', c['batch'], args, tmp)
        setup_s = time.perf_counter() - t0
        peak()                                        # the anchor's operands exist before the peaks are reset
        if not dry: torch.cuda.reset_peak_memory_stats()
        steps = []
        for i in range(c['warmup']):
            dt, loss, _ = run.step()
            steps.append(dict(step=f'warm-up {i + 1}', seconds=f'{dt:.2f}', loss=f'{loss:.3f}', recompiles_so_far=counter.n))
            rep.rows(steps)
        anchor = peak()
        for i in range(c['steps']):
            dt, loss, cpu_util = run.step()
            after = peak(); run.steps.append((dt, loss, (anchor + after) / 2, cpu_util)); anchor = after
            steps.append(dict(step=f'timed {i + 1}', seconds=f'{dt:.3f}', loss=f'{loss:.3f}', recompiles_so_far=counter.n))
            rep.rows(steps)
        alloc = torch.cuda.max_memory_allocated() / 1e9 if not dry else None
        reserved = torch.cuda.max_memory_reserved() / 1e9 if not dry else None
        s = run.summary()
    peak_gb = reserved
    row = {'size': s['size'], 'params': f"{s['params'] / 1e6:.2f}M", 'L': s['L'], 'batch': s['batch'], 's/step': f"{s['step_s']:.3f}",
           'tokens/s (real)': f"{s['tok_s']:,.0f}", f"goal >= {GOALS['tokens_per_s']:,}": goal(s['tok_s'] >= GOALS['tokens_per_s'], dry),
           'MFU dense-eq': f"{s['mfu_dense']:.1%}", 'MFU attended pairs': f"{s['mfu_pairs']:.1%}", 'anchor GFLOP/s': f"{s['anchor']:.0f}",
           'peak allocated GB': '-' if alloc is None else f'{alloc:.2f}', 'peak reserved GB': '-' if reserved is None else f'{reserved:.2f}',
           f"goal <= {GOALS['peak_gb']:g} GB (reserved)": goal(None if peak_gb is None else peak_gb <= GOALS['peak_gb'], dry),
           'recompiles': counter.n, 'first step s (compile)': steps[0]['seconds'], 'masks ms': f"{s['mask_ms']:.1f}", 'set-up s': f'{setup_s:.1f}'}
    rep.add('## Result', '', md_table([row]), '',
            f"Pad {s['pad_frac']:.1%}; attended pairs per real token {s['pairs_per_tok']:.0f}; loss {s['loss_first']:.3f} -> {s['loss_last']:.3f} "
            f"over the timed steps. MFU as in bench/train.py (dense-equivalent: 6N + 12 n_layer d_model L per token; attended "
            f"pairs: the True entries of the batch's masks). Peak memory in GB (1e9 bytes), the goal's unit." +
            (f" Recompile reasons: {'; '.join(counter.reasons[:4])}." if counter.reasons else ''))
    return True


# ---------------------------------------------------------------------------------------------- 3. attention
def item_attention(cfg, rep: Report, dry: bool) -> bool:
    "One layer's attention (both stages) forward + backward: flex vs dense causal sdpa vs the densified mask; mask build time."
    import torch
    import torch.nn.functional as F
    from meloformer.attention import MaskConfig, build_masks, attend
    from meloformer.tokenizer import HIDTokenizer
    from meloformer.data import demo_dataset, make_loader
    from meloformer.train import batch_to
    ba = load_bench('attention')
    c = cfg['attention']
    dev, dtype, H, D = ('cpu' if dry else 'cuda'), getattr(torch, c['dtype']), c['heads'], c['head_dim']
    tok = HIDTokenizer()
    files, source = ba.midi_files()
    pieces = {p.stem: tok.annotate(tok.encode(p)) for p in files}
    longest = max(pieces, key=lambda k: len(pieces[k]['seg']))
    assert len(pieces[longest]['seg']) >= max(c['lengths']), f"no piece of {max(c['lengths'])} tokens in {source}"
    rep.add(f"Prefixes of *{longest}* ({len(pieces[longest]['seg'])} tokens, from {source}); B = 1, {H} heads x {D}, {c['dtype']}. "
            "`museformer`: both stages of a layer through `attend` with the model's flex block masks (block 128): summaries "
            "read summaries and their segment (S x (S + L)), tokens read tokens and ended summaries (L x (L + S)). "
            "`dense causal`: one sdpa `is_causal` call over L tokens (flash attention on CUDA). `densified`: the same two "
            "museformer masks as dense booleans through sdpa. Median of repeats after a warm-up (the first call compiles)." +
            (" Dry run: flex forward only (no CPU backward); the others forward + backward." if dry else ''), '', '## Forward + backward', '')
    rows = []
    for L, reps in zip(c['lengths'], c['repeats']):
        meta = {k: v.to(dev) for k, v in ba.to_batch(pieces[longest], L).items()}
        mf, ms = build_masks(meta, MaskConfig(), 'flex'), build_masks(meta, MaskConfig(), 'sdpa')
        S = mf.meta.S
        g = torch.Generator(device=dev).manual_seed(0)
        leaf = lambda n: torch.randn(1, H, n, D, device=dev, dtype=dtype, generator=g).requires_grad_(True)
        q, kv_upd, qs, kv_sum = leaf(L), leaf(L + S), leaf(S), leaf(S + L)
        def layer(masks, backward):
            a, b, c_, d = (t if backward else t.detach() for t in (qs, kv_sum, q, kv_upd))   # CPU flex: inputs without grad
            def f():
                y = attend(a, b, b, masks.summarize).sum() + attend(c_, d, d, masks.update).sum()
                if backward: y.backward()
            return f
        def causal():
            F.scaled_dot_product_attention(q, kv_upd[:, :, :L], kv_upd[:, :, :L], is_causal=True).sum().backward()
        t_flex = median_s(layer(mf, not dry), reps)
        t_causal = median_s(causal, reps)
        t_dense = median_s(layer(ms, True), reps)
        ratio = t_causal / t_flex
        target = GOALS['speedup_8192'] if L <= 8192 else GOALS['speedup_24576']
        rows.append({'L': L, 'S': S, f"museformer flex ms ({'fwd' if dry else 'fwd+bwd'})": f'{1e3 * t_flex:.2f}',
                     'dense causal ms': f'{1e3 * t_causal:.2f}', 'densified ms': f'{1e3 * t_dense:.2f}',
                     'causal / flex': f'{ratio:.2f}x', f'goal': f">= {target:g}x: {goal(ratio >= target, dry)}",
                     'densified / flex': f'{t_dense / t_flex:.2f}x'})
        rep.rows(rows)
        del mf, ms, q, kv_upd, qs, kv_sum
        if not dry: torch.cuda.empty_cache()
    # block masks of a training batch: what every step builds on the host side before the forward
    B, L0 = c['build_batch'], c['lengths'][0]
    batch = next(iter(make_loader(demo_dataset('train', max_seq_len=L0), B, seed=0)))
    _, meta_b, _ = batch_to(batch, dev)
    builds = [(f"training batch {tuple(meta_b['seg'].shape)} (demo corpus)", meta_b),
              (f"1 x {c['lengths'][-1]} ({longest})", {k: v.to(dev) for k, v in ba.to_batch(pieces[longest], c['lengths'][-1]).items()})]
    brows = [{'batch': name, 'build_masks flex ms': f"{1e3 * median_s(lambda: build_masks(m, MaskConfig(), 'flex'), 5 if not dry else 2):.1f}"}
             for name, m in builds]
    rep.add('## Block-mask build time per batch', '', 'Both stages\' `BlockMask`s (`build_masks(meta, MaskConfig(), "flex")`, '
            'compiled `create_block_mask`), median of repeats after a warm-up.', '', md_table(brows))
    return True


# ---------------------------------------------------------------------------------------------- 4. memory
def item_memory(cfg, rep: Report, dry: bool) -> bool:
    "meloformer.memory's estimator against measured steps, one row at a time, then its length finder."
    import torch
    from meloformer.memory import compare_estimates, find_max_seq_len, estimate_memory, measure_step
    from meloformer.model import ModelConfig
    from meloformer.tokenizer import HIDTokenizer
    c = cfg['memory']
    dev = 'cpu' if dry else 'cuda'
    kw = dict(precision='fp32', backend='sdpa') if dry else dict(precision='bf16', backend='flex')
    if not dry:
        # each new (batch, length) compiles flex_attention anew (static shapes); dynamo's default limit (8) would
        # quietly fall back to eager flex, which materializes the full score matrix and ruins the measurement
        import torch._dynamo.config as dc
        for name in ('recompile_limit', 'cache_size_limit', 'accumulated_recompile_limit'):
            if hasattr(dc, name): setattr(dc, name, 256)
    rep.add(f"`compare_estimates` one row at a time ({kw['precision']}, {kw['backend']}, 2 eager training steps per row on the "
            f"demo corpus tiled to L; {'CPU: peak RSS of a fresh process' if dry else 'CUDA: max_memory_allocated'}), then "
            "`find_max_seq_len`" + (" with the estimator, checked by one measured step at the length it finds." if dry else
            " measured (a binary search of real steps) beside the estimator's answer.") +
            f" Goal: estimate within {GOALS['estimator_pct']:g}% of the measured peak.", '', '## Estimator vs measured', '')
    rows = []
    def estimator_rows(grid):
        for size, B, L in grid:
            t0 = time.perf_counter()
            try: r = compare_estimates([(size, B, L)], device=dev, **kw).iloc[0]
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(size=size, batch=B, seq_len=L, measured_MiB='out of memory', seconds=f'{time.perf_counter() - t0:.1f}'))
            else:
                err = float(r.error_pct)
                rows.append(dict(size=size, batch=B, seq_len=int(r.seq_len), measured_MiB=r.measured_mb, estimated_MiB=r.estimated_mb,
                                 error_pct=f'{err:+.1f}', goal=f"within {GOALS['estimator_pct']:g}%: {goal(abs(err) <= GOALS['estimator_pct'], dry)}",
                                 seconds=f'{time.perf_counter() - t0:.1f}'))
            rep.rows(rows)
            if not dry: torch.cuda.empty_cache()
    estimator_rows(c['grid'])
    f = dict(c['finder'])
    size = f.pop('size')
    if f['budget_gb'] is None:       # dry run: the budget the estimator gives a 1024-token step of this size
        f['budget_gb'] = round(estimate_memory(ModelConfig.from_size(size, vocab_size=HIDTokenizer().vocab_size), 1, 1024, **kw, device=dev)['total'] / 1024, 3)
    frows = []
    for measure in ([False] if dry else [True, False]):
        t0 = time.perf_counter()
        r = find_max_seq_len(size, device=dev, measure=measure, **f, **kw)
        frows.append(dict(size=size, batch=r['batch_size'], budget_GB=r['budget_gb'], max_seq_len=r['max_seq_len'], how=r['how'],
                          seconds=f'{time.perf_counter() - t0:.1f}'))
        if not dry: torch.cuda.empty_cache()
    if dry:                          # the finder's answer, measured: does a step of that length fit the budget?
        m = measure_step(size, f['batch_size'], frows[0]['max_seq_len'], dev, **kw)
        frows[0]['measured MiB at that length'] = m['peak_mb']
        frows[0]['budget MiB'] = round(f['budget_gb'] * 1024, 1)
    rep.add('## Longest sequence that fits', '', f"`find_max_seq_len(size, budget_gb, batch_size, multiple={f['multiple']}, "
            f"max_len={f['max_len']})`.", '', md_table(frows))
    if c['after']:
        rep.add('## Estimator vs measured: the release batch', '')
        rows = []
        estimator_rows(c['after'])
    return True


# ---------------------------------------------------------------------------------------------- 5. generation
def item_generate(cfg, rep: Report, dry: bool) -> bool:
    "Cached decoding (IncrementalDecoder) at a long context, eager and with the one-token step compiled."
    import torch
    import meloformer.generate as mg
    from meloformer.tokenizer import HIDTokenizer
    from meloformer.model import MeloFormer, ModelConfig
    bg = load_bench('generate')
    c = cfg['generate']
    dev = 'cpu' if dry else 'cuda'
    tok = HIDTokenizer()
    ids = bg.stream(tok, c['ctx'] + c['warmup'] + c['steps'] + 1)
    n_seg = int(tok.annotate(ids)['seg'].max()) + 2
    torch.manual_seed(0)
    model = MeloFormer(ModelConfig.from_size(c['size'], vocab_size=tok.vocab_size)).to(dev).eval()
    rep.add(f"`{c['size']}` (fp32, batch 1, `museformer` masks), a real token stream teacher forced: prefill {c['ctx']} tokens "
            f"(eager), {c['warmup']} warm-up steps, then {c['steps']} timed one-token steps through `IncrementalDecoder.feed`. "
            f"Compiled: `torch.compile(meloformer.generate.forward_cached, backend={c['backend']!r})` for the steps "
            "(the prefill stays eager)." + (" Dry run: dynamo with the eager backend (no inductor code generation)." if dry else ''),
            '', '## Tokens per second', '')
    def decode(step_fn) -> tuple[float, float]:
        dec = mg.IncrementalDecoder(model, tok, 1, max_len=c['ctx'] + c['warmup'] + c['steps'] + 8, max_segments=n_seg, device=dev)
        with torch.no_grad():
            dec.feed(ids[None, :c['ctx']]); sync()
            mg.forward_cached = step_fn
            try:
                t0 = time.perf_counter()
                for i in range(c['ctx'], c['ctx'] + c['warmup']): dec.feed(ids[None, i:i + 1])
                sync(); warm = time.perf_counter() - t0
                t0 = time.perf_counter()
                for i in range(c['ctx'] + c['warmup'], c['ctx'] + c['warmup'] + c['steps']): dec.feed(ids[None, i:i + 1])
                sync(); return c['steps'] / (time.perf_counter() - t0), warm
            finally: mg.forward_cached = eager_step
    eager_step = mg.forward_cached
    eager, _ = decode(eager_step)
    rows = [{'step': 'eager', 'tokens/s': f'{eager:,.1f}', 'vs eager': '1.00x', 'warm-up s': '-', 'recompiles': '-'}]
    rep.rows(rows)
    counter = RecompileCounter()
    from torch._dynamo.utils import counters
    frames = counters['frames']['total']
    compiled_ok = True
    try:
        compiled, warm = decode(torch.compile(eager_step, backend=c['backend']))
        rows.append({'step': f"compiled ({c['backend']})", 'tokens/s': f'{compiled:,.1f}', 'vs eager': f'{compiled / eager:.2f}x',
                     'warm-up s': f'{warm:.1f}', 'recompiles': counter.n})
        note = f"Recompile reasons (first 4): {'; '.join(counter.reasons[:4])}." if counter.reasons else ''
    except Exception as e:
        traceback.print_exc()
        rows.append({'step': 'compiled', 'tokens/s': 'not available', 'vs eager': '-', 'warm-up s': '-', 'recompiles': counter.n})
        compiled_ok = False                           # a check that cannot compile the step has failed, not passed
        note = f"Compiling the one-token step failed with the current code: `{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}`."
    rep.rows(rows)
    if note: rep.add(note)
    if counters['frames']['total'] == frames:        # the check itself is out of date: fail, do not report eager as compiled
        raise RuntimeError("the compiled step was never called: IncrementalDecoder.feed no longer calls meloformer.generate.forward_cached")
    return compiled_ok


# ---------------------------------------------------------------------------------------------- runner
TITLES = dict(gpu_cells='the `#| gpu` notebook cells', train='training throughput', attention='attention forward + backward',
              memory='memory estimator and length finder', generate='cached generation')


def run_item(item: str, out_dir: Path, dry: bool) -> int:
    "In a child process: one item, its report, exit 0 (passed) or 1 (a check failed or an error)."
    import torch
    torch.manual_seed(0)
    if dry:     # dynamo and AOTAutograd trace as on the GPU; inductor's CPU code generation (C++, not the GPU's Triton) is skipped
        import functools
        compile_ = torch.compile
        torch.compile = functools.wraps(compile_)(lambda *args, **kw: compile_(*args, **{'backend': 'aot_eager', **kw}))
    rep = Report(out_dir / f'{item}.md', TITLES[item], dry, 'cpu' if dry else f'cuda ({torch.cuda.get_device_name()})')
    t0 = time.perf_counter()
    try: ok = globals()[f'item_{item}'](CONFIG['dry' if dry else 'gpu'], rep, dry)
    except Exception as e:
        traceback.print_exc()
        rep.add(f"**ERROR** after {time.perf_counter() - t0:.0f} s: `{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}` "
                "(traceback in the log)."); return 1
    rep.add(f"Item time {time.perf_counter() - t0:.0f} s{'' if ok else '; **a check FAILED** (see above)'}.")
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true', help="run every item on CPU with tiny sizes and short lengths (CI)")
    p.add_argument('--items', nargs='+', choices=ITEMS, default=ITEMS, help="items to run, in the given order (default: all)")
    p.add_argument('--out_dir', default=None, help="where <item>.md and summary.md go (default: bench/results/gpu; dry run: a new temp folder)")
    p.add_argument('--budgets', nargs='+', default=[], metavar='ITEM=SECONDS', help="override an item's time budget, e.g. train=300")
    p.add_argument('--total_s', type=float, default=None, help=f"budget of the whole run (default: {TOTAL_GPU} s on GPU, {TOTAL_DRY} s dry)")
    p.add_argument('--rehearse', action='store_true', help="dry run: also run the gpu notebook cells on CPU (device 'cpu', tiny "
                   "model, lengths 256) up to their first flex backward; ~1-2 minutes more, not in CI")
    p.add_argument('--_child', default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    global REHEARSE
    REHEARSE = a.rehearse
    if a.rehearse and not a.dry_run:
        print("gpu_check.py: --rehearse goes with --dry-run (on a GPU the cells run for real)", file=sys.stderr); return 2
    if a._child: return run_item(a._child, Path(a.out_dir), a.dry_run)
    budgets = dict(BUDGET_DRY if a.dry_run else BUDGET_GPU)
    if a.rehearse: budgets['gpu_cells'] = 300          # three cells compiled and run on CPU
    for spec in a.budgets:
        name, _, sec = spec.partition('=')
        if name not in ITEMS or not re.fullmatch(r'\d+(\.\d+)?', sec):
            print(f"gpu_check.py: --budgets {spec!r}: expected ITEM=SECONDS with ITEM one of {', '.join(ITEMS)}", file=sys.stderr); return 2
        budgets[name] = float(sec)
    if not a.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check.py: no CUDA device here; `--dry-run` runs the same items on CPU", file=sys.stderr); return 2
    out = Path(a.out_dir) if a.out_dir else Path(tempfile.mkdtemp(prefix='meloformer-gpu-dry-')) if a.dry_run else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / 'logs').mkdir(exist_ok=True)
    total = a.total_s or (TOTAL_DRY if a.dry_run else TOTAL_GPU)
    print(f"GPU check{' (CPU dry run)' if a.dry_run else ''}: items {', '.join(a.items)}; results in {out}; "
          f"budgets {', '.join(f'{i} {budgets[i]:.0f} s' for i in a.items)}, whole run {total:.0f} s", flush=True)
    start, summary = time.perf_counter(), []
    for item in a.items:
        left = total - (time.perf_counter() - start)
        budget = min(budgets[item], left)
        md, log = out / f'{item}.md', out / 'logs' / f'{item}.log'
        if left < 15:
            summary.append(dict(item=item, status='SKIPPED (no time left in the whole run)', seconds='0', file='-')); continue
        print(f"== {item} (budget {budget:.0f} s, log {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, 'w') as lf:
            cmd = ([sys.executable, __file__, '--_child', item, '--out_dir', str(out)] + (['--dry-run'] if a.dry_run else [])
                   + (['--rehearse'] if a.rehearse else []))
            # dry run: one thread per process; two OpenMP threads on two cores that other work shares made a tiny step ~4-70x slower
            env = {**os.environ, **({'OMP_NUM_THREADS': '1'} if a.dry_run else {})}
            p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
            try: rc = p.wait(timeout=budget)
            except subprocess.TimeoutExpired:       # the item and whatever it started (compile workers, loaders)
                os.killpg(p.pid, signal.SIGTERM)
                try: p.wait(timeout=10)
                except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait()
                rc = None
        dt = time.perf_counter() - t0
        status = 'pass' if rc == 0 else f'CUT after {dt:.0f} s (budget {budget:.0f} s)' if rc is None else 'FAIL' if rc == 1 else f'ERROR (exit {rc})'
        if rc is None:
            with open(md, 'a') as f:
                f.write(f"\n**CUT**: over its budget of {budget:.0f} s; the figures above are those finished before the cut.\n")
        if rc != 0:
            tail = log.read_text(errors='replace').splitlines()[-25:]
            print(f"-- {item}: {status}; last lines of {log}:", *('   ' + l for l in tail), sep='\n', flush=True)
        summary.append(dict(item=item, status=status, seconds=f'{dt:.0f}', file=md.name if md.exists() else '-'))
        print(f"-- {item}: {status} in {dt:.0f} s -> {md}", flush=True)
    table = md_table(summary)
    (out / 'summary.md').write_text(f"# GPU check{' (CPU dry run)' if a.dry_run else ''}\n\n{machine('cpu' if a.dry_run else 'cuda')}.\n\n"
                                    f"Whole run {time.perf_counter() - start:.0f} s (budget {total:.0f} s).\n\n{table}\n")
    print(f"\n{table}\n\nwhole run {time.perf_counter() - start:.0f} s; files in {out}", flush=True)
    return 0 if all(r['status'] == 'pass' for r in summary) else 1


if __name__ == '__main__': sys.exit(main())
