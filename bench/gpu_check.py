"""The GPU path in one prepared check: the `gpu` notebook cells, training throughput, attention, memory, generation.

    python bench/gpu_check.py                        # on one CUDA device: every item in order, ~9 minutes at most
    python bench/gpu_check.py --items train memory   # some items only
    python bench/gpu_check.py --dry-run              # the same items through the same code on CPU, tiny sizes (CI)

Items, in order, each run in its own process with its own time budget (an item over its budget is cut and
reported as cut; the others still run):

1. `gpu_cells`: the `#| gpu` cells of the notebooks (flex forward + backward against the sdpa reference, a
   compiled bf16 training step of `small` at L = 8192), each with the definitions it needs from its notebook.
2. `train`: training throughput of `small` at L = 8192, batch 6, compiled, bf16, flex (bench/train.py's `Run`:
   the real `Trainer.train_step`), the summary slots padded to one bound so the compiled step keeps one shape:
   tokens/s, MFU against the device's spec bf16 peak (dense-equivalent and attended pairs; a measured matmul
   beside it), peak memory of the timed steps, compilations (the item fails if any happens after the warm-up).
3. `attention`: forward + backward of one layer's attention at L = 8192 and 24576: `museformer` flex vs dense
   causal flash attention (sdpa `is_causal`) vs the same mask densified (sdpa); block-mask build time per batch.
4. `memory`: `meloformer.memory`'s estimator against measured peaks (the release batch 6 x 8192 first, then small
   and base at 2 lengths each), then `find_max_seq_len`'s answer checked by measured steps (a bounded number of
   probes, each started only when the item's budget covers it).
5. `generate`: cached generation tokens/s of `small` at a 4k context, eager and with the one-token step compiled;
   an untimed pass over the same positions compiles every shape first, and a compilation inside the timed
   steps fails the item.

Each item writes `<out_dir>/<item>.md` (run id, machine, GPU, driver, torch, date in its header; its status,
written by the runner when the item ends: pass, FAIL, CUT or ERROR; goals beside the figures; memory in GiB)
and the run writes `<out_dir>/summary.md` (updated after every item). An item's file is removed before the
item starts, so a file never mixes runs. All items share one compile cache, `<out_dir>/compile_cache/`
(inductor's FX graph and AOTAutograd caches, Triton's kernels): a graph met again (in a later item, a recompile, the
next run) is loaded, not compiled again; each item reports its compile seconds and cache hits. GPU results go to
bench/results/gpu/. The exit status is non-zero when an item fails, errors or is cut.

`--dry-run` runs every item on CPU with tiny sizes and short lengths, writing the same files to a temp folder
(CI runs it so that a change that breaks the GPU check breaks CI): FlexAttention forward only (it has no CPU
backward), training steps on the sdpa backend; the `train` steps and the one-token `generate` step are compiled
by inductor (its CPU code generation, so the lowering the GPU also goes through is exercised), the other
compiles use the `aot_eager` backend to keep the dry run short.
"""
import argparse, ast, contextlib, datetime, importlib.util, io, json, logging, os, platform, re, signal, statistics
import subprocess, sys, symtable, tempfile, time, traceback, types, uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / 'results' / 'gpu'
ITEMS = ['gpu_cells', 'train', 'attention', 'memory', 'generate']
# seconds per item, process start-up included. GPU: the whole at most 9 minutes; these are estimates (no GPU run yet):
# each new shape compiles flex attention (forward and backward) anew, ~15-20 s on an H100-class GPU, and `memory`
# meets 5 shapes plus up to 3 finder probes. Dry run: a cut fails CI; the dry run takes ~1.5 minutes of one idle core.
BUDGET_GPU = dict(gpu_cells=100, train=150, attention=70, memory=160, generate=60)
BUDGET_DRY = dict(gpu_cells=90, train=150, attention=90, memory=90, generate=150)
TOTAL_GPU, TOTAL_DRY = 540, 600
REHEARSE = False                       # --rehearse (dry run): run the gpu cells on CPU too
GiB = 2 ** 30
# goals of bench/README.md; the memory goal is 15 GB (1e9 bytes), reported in GiB as every memory figure here
GOALS = dict(tokens_per_s=300_000, peak_gib=15e9 / GiB, speedup_8192=1.5, speedup_24576=3.0, estimator_pct=20.0)
# dense bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (without sparsity), matched in order on the
# upper-cased device name; None (and any name not listed): MFU against the matmul measured in the same run instead
SPEC_BF16_TFLOPS = ((('H100', 'PCIE'), 756), (('H800', 'PCIE'), 756), (('NVL',), None),
                    (('H100',), 989), (('H200',), 989), (('H800',), 989), (('A100',), 312), (('L40S',), 362))

# what each item runs: GPU sizes, and the dry run's tiny stand-ins (same code paths)
CONFIG = dict(
    # workers 0: the demo corpus gives 7 batches of 6 x 8192 per epoch, and each new epoch would start new loader
    # workers inside a timed step; collating a batch in the main process takes ~1 ms
    gpu=dict(train=dict(size='small', L=8192, batch=6, warmup=3, steps=10, workers=0, anchor_n=8192, anchor_repeats=10, extra_slots=0),
             attention=dict(lengths=(8192, 24576), heads=6, head_dim=64, dtype='bfloat16', repeats=(10, 5), build_batch=6),
             # the release batch first: a cut then loses the finder, not the goal's row
             memory=dict(rows=[('small', 6, 8192), ('small', 1, 4096), ('base', 1, 4096), ('small', 1, 16384), ('base', 1, 16384)],
                         finder=dict(size='small', batch_size=1, budget_gb=8.0, multiple=8192, max_len=131072, max_probes=3)),
             generate=dict(size='small', ctx=4096, steps=64, backend='inductor')),
    # extra_slots: the dry run's short rows all have the same summary count; one multiple more gives every batch unused
    # slots, as most batches have on the GPU (where the largest count sets the bound)
    dry=dict(train=dict(size='tiny', L=256, batch=2, warmup=2, steps=2, workers=0, anchor_n=512, anchor_repeats=3, extra_slots=64),
             attention=dict(lengths=(128, 256), heads=2, head_dim=32, dtype='float32', repeats=(2, 2), build_batch=1),
             memory=dict(rows=[('tiny', 2, 512)],
                         finder=dict(size='tiny', batch_size=1, budget_gb=None, multiple=128, max_len=4096, max_probes=2)),
             generate=dict(size='tiny', ctx=256, steps=12, backend='inductor')))


# ---------------------------------------------------------------------------------------------- reports
def machine(device: str) -> str:
    "CPU, GPU, driver, CUDA, torch, Python and date: the header line of every result file."
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    gpu = 'none'
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / GiB:.0f} GiB"
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


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


STATUS_RUNNING = '**Status: running**'


class Report:
    """One item's markdown file, rewritten atomically after every addition: a cut item keeps what it finished. The
    status line under the machine line says `running` until the runner writes how the item ended."""
    def __init__(self, path: Path, title: str, dry: bool, device: str, run_id: str):
        self.path, self.parts = path, [f"# GPU check: {title}", '', machine(device) + f"; run `{run_id}`.", '',
                                       STATUS_RUNNING + f" (run `{run_id}`; still here: the whole check was stopped during this item).", '',
                                       '**CPU dry run**: tiny sizes, short lengths; the figures check the code path, '
                                       'not the GPU goals.' if dry else 'One CUDA device; goals beside the figures; memory in GiB (2^30 bytes).']
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


def set_status(md: Path, title: str, status: str, run_id: str, device: str):
    "The runner's last word in an item's file: its status line replaces `running` (a file the item never wrote gets one)."
    line = f"**Status: {status}** (run `{run_id}`)."
    if not md.exists():
        md.write_text(f"# GPU check: {title}\n\n{machine(device)}; run `{run_id}`.\n\n{line}\n\nThe item wrote nothing (see its log).\n")
        return
    lines = md.read_text().splitlines()
    at = next((i for i, l in enumerate(lines) if l.startswith(STATUS_RUNNING)), None)
    if at is None: lines += ['', line]
    else: lines[at] = line
    md.write_text('\n'.join(lines) + '\n')


def load_bench(name: str):
    "A sibling benchmark script (bench/<name>.py) as a module, so its functions are reused, not copied."
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCH / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


class CompileWatch:
    """Every compilation in this process: dynamo's frames and AOTAutograd's lazily compiled backward graphs, from
    dynamo's compile callbacks, with their seconds; the failed guard of each recompilation, from its `recompiles` log
    (kept, not printed). `mark()` then `since(mark)`: the compilations in a window (a timed window must have none)."""
    def __init__(self):
        import torch, torch._dynamo.callback as cb
        self.starts, self.seconds, self.reasons, self._open, self.resets = [], 0.0, [], [], 0
        cb.callback_handler.register_start_callback(self._start)
        cb.callback_handler.register_end_callback(self._end)
        torch._logging.set_logs(recompiles=True)
        logging.getLogger('torch._dynamo.guards.__recompiles').addFilter(self._reason)

    def _start(self, args):
        self.starts.append(f"{args.compile_id} ({args.callback_trigger.name.lower().replace('_', ' ')})")
        self._open.append(time.perf_counter())

    def _end(self, args):
        if self._open: self.seconds += time.perf_counter() - self._open.pop()

    def _reason(self, rec) -> bool:
        why = next((l.strip() for l in rec.getMessage().splitlines() if l.strip().startswith('- ')), '?')
        self.reasons.append(why.split('#')[0].strip(' -') or why)     # the failed guard, without the source comment
        return False

    def _frames(self) -> int:
        "Frames dynamo converted (skipped ones too), from its counters: they survive `torch._dynamo.reset()`, which drops callbacks."
        from torch._dynamo.utils import counters
        return counters['frames']['total']

    def _ensure(self):
        import torch._dynamo.callback as cb
        if self._start not in cb.callback_handler.start_callbacks:
            cb.callback_handler.register_start_callback(self._start); cb.callback_handler.register_end_callback(self._end)
            self.resets += 1

    @property
    def n(self) -> int: return len(self.starts)
    def mark(self) -> tuple: self._ensure(); return len(self.starts), self._frames(), self.resets

    def since(self, mark: tuple) -> list[str]:
        "The compilations after `mark`; where a reset dropped the callbacks meanwhile, dynamo's frame count stands in."
        self._ensure()
        seen = self.starts[mark[0]:]
        if self.resets == mark[2]: return seen
        unseen = self._frames() - mark[1] - sum('(dynamo)' in s for s in seen)
        return seen + ['? (a frame converted while a reset had dropped the callbacks)'] * max(unseen, 0)

    def cache(self) -> dict:
        "FX graph and AOTAutograd cache hits and misses so far (the shared compile cache at work)."
        from torch._dynamo.utils import counters
        return dict(fx_hit=counters['inductor']['fxgraph_cache_hit'], fx_miss=counters['inductor']['fxgraph_cache_miss'],
                    aot_hit=counters['aot_autograd']['autograd_cache_hit'], aot_miss=counters['aot_autograd']['autograd_cache_miss'])

    def line(self) -> str:
        c = self.cache()
        return (f"{self.n} compilation(s), {self.seconds:.1f} s; compile cache: FX graphs {c['fx_hit']} hit / {c['fx_miss']} "
                f"missed, AOTAutograd {c['aot_hit']} hit / {c['aot_miss']} missed")


WATCH: CompileWatch | None = None      # the item's, set up by run_item before the item starts
DEADLINE = float('inf')                # time.time() by which the runner cuts the item (its budget): items that pace themselves


def sync():
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()


def median_s(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup): fn()
    sync(); times = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - t)
    return statistics.median(times)


def spec_peak_tflops(device_name: str) -> float | None:
    "The device's dense bf16 peak from `SPEC_BF16_TFLOPS`, or None where the table has no entry for it."
    name = device_name.upper()
    return next((tflops for keys, tflops in SPEC_BF16_TFLOPS if all(k in name for k in keys)), None)


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
def fixed_summary_slots(model, batches: list, extra: int = 0) -> tuple[int, list[int]]:
    """One summary-slot count for every batch the item will step through (the largest of their own counts, already a
    multiple of the mask's `summary_multiple`, plus `extra`), and their own counts; `model.build_masks` then pads every
    batch to it, so the compiled step meets one shape. Unused slots end at L: no query reads them."""
    from meloformer.attention import build_masks, n_summary_slots, segment_slots
    from meloformer.model import batch_to
    mult = model.cfg.mask.summary_multiple
    own = []
    for batch in batches:
        _, meta, _ = batch_to(batch, 'cpu')
        own.append(n_summary_slots(segment_slots(meta['seg'], meta.get('doc')), mult))
    S = max(own) + extra
    cfg = model.cfg
    model.build_masks = lambda meta, backend=None: build_masks(meta, cfg.mask, backend or cfg.attn_backend, cfg.block_size, n_summaries=S)
    return S, own


def item_train(cfg, rep: Report, dry: bool) -> bool:
    """bench/train.py's `Run` (a real `Trainer`, compiled) at the release's size, length and batch, the summary slots
    padded to one count; the matmul anchor measured before and after the steps (its operands freed before the
    memory peaks are reset); compilations after the warm-up fail the item."""
    import torch
    bt = load_bench('train')
    c = cfg['train']
    device = torch.device('cpu' if dry else 'cuda')
    dtype = torch.float32 if dry else torch.bfloat16
    args = argparse.Namespace(device=device.type, num_workers=c['workers'], compile=True)
    name = 'cpu' if dry else torch.cuda.get_device_name()
    spec = None if dry else spec_peak_tflops(name)
    if dry:      # the table's lookup, checked where it cannot be measured
        for dev_name, want in (('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H200', 989), ('NVIDIA H800', 989),
                               ('NVIDIA A100-SXM4-80GB', 312), ('NVIDIA L40S', 362), ('NVIDIA H100 NVL', None), ('Tesla T4', None)):
            assert spec_peak_tflops(dev_name) == want, (dev_name, spec_peak_tflops(dev_name), want)
    def anchor() -> float:
        "GFLOP/s of the square matmul; its operands are freed at once (they must not count in the steps' peaks)."
        r = bt.matmul_peak(device, c['anchor_n'], dtype, repeats=c['anchor_repeats'], warmup=1)['median']
        bt._operands.clear()
        if not dry: torch.cuda.empty_cache()
        return r
    basis = (f"the spec dense bf16 peak of {name}, {spec:g} TFLOP/s" if spec else
             f"the measured {'fp32' if dry else 'bf16'} matmul ({name} has no spec peak in the table)")
    rep.add(f"`{c['size']}` at L = {c['L']}, batch {c['batch']}, `museformer` masks, `torch.compile` through `Trainer` "
            f"({'sdpa, fp32 (CPU: no flex backward), inductor' if dry else 'flex, bf16 autocast'}), rows of the embedded demo "
            f"corpus drawn before the first step; the summary slots of every batch padded to the largest count among them"
            f"{f' plus {extra}' if (extra := c['extra_slots']) else ''}, so the compiled step keeps one shape. {c['warmup']} warm-up step(s) (the first compiles), then {c['steps']} timed steps "
            f"(any compilation among them fails the item). MFU against {basis}; the matmul anchor ({'fp32' if dry else 'bf16'} "
            f"{c['anchor_n']} x {c['anchor_n']}, median of {c['anchor_repeats']}) is measured before the warm-up and after the timed "
            "steps, and its operands are freed before the memory peaks are reset. Memory: `torch.cuda.max_memory_allocated` / "
            "`max_memory_reserved` of the timed steps (reset after the warm-up, the allocator's cache emptied), GiB.",
            '', '## Steps', '')
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with inductor_in_dry_run(): run = bt.Run(c['size'], c['L'], 'museformer', c['batch'], args, tmp)   # Trainer compiles here
        trainer = run.trainer
        batches = [trainer._next_batch(run.phase) for _ in range(c['warmup'] + c['steps'])]   # recorded by Run, in order
        trainer._next_batch = lambda phase, queue=iter(batches): next(queue)
        S, own = fixed_summary_slots(trainer.model, batches, c['extra_slots'])
        setup_s = time.perf_counter() - t0
        anchor_before = anchor()
        if not dry: torch.cuda.reset_peak_memory_stats()
        steps, compiled_at = [], WATCH.mark()
        for i in range(c['warmup']):
            dt, loss, _ = run.step()
            steps.append(dict(step=f'warm-up {i + 1}', seconds=f'{dt:.2f}', loss=f'{loss:.3f}', compilations=len(WATCH.since(compiled_at))))
            rep.rows(steps); compiled_at = WATCH.mark()
        warm_alloc = torch.cuda.max_memory_allocated() / GiB if not dry else None
        if not dry: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        timed_at, timed = WATCH.mark(), []
        for i in range(c['steps']):
            dt, loss, cpu_util = run.step()
            timed.append((dt, loss, cpu_util))
            steps.append(dict(step=f'timed {i + 1}', seconds=f'{dt:.3f}', loss=f'{loss:.3f}', compilations=len(WATCH.since(compiled_at))))
            rep.rows(steps); compiled_at = WATCH.mark()
        late = WATCH.since(timed_at)
        alloc = torch.cuda.max_memory_allocated() / GiB if not dry else None
        reserved = torch.cuda.max_memory_reserved() / GiB if not dry else None
        anchor_after = anchor()
        run.steps = [(dt, loss, (anchor_before + anchor_after) / 2, cpu_util) for dt, loss, cpu_util in timed]
        s = run.summary()
    matmul = (anchor_before + anchor_after) / 2           # GFLOP/s
    peak_gflops = spec * 1e3 if spec else matmul
    row = {'size': s['size'], 'params': f"{s['params'] / 1e6:.2f}M", 'L': s['L'], 'batch': s['batch'], 'summary slots': S,
           's/step': f"{s['step_s']:.3f}", 'tokens/s (real)': f"{s['tok_s']:,.0f}",
           f"goal >= {GOALS['tokens_per_s']:,}": goal(s['tok_s'] >= GOALS['tokens_per_s'], dry),
           f"MFU dense-eq (vs {'spec' if spec else 'matmul'})": f"{s['gflops_dense'] / peak_gflops:.1%}",
           f"MFU attended pairs (vs {'spec' if spec else 'matmul'})": f"{s['gflops_pairs'] / peak_gflops:.1%}",
           'spec peak TFLOP/s': f'{spec:g}' if spec else 'not in table',
           'measured matmul TFLOP/s': f"{matmul / 1e3:.3g} ({anchor_before / 1e3:.3g} before, {anchor_after / 1e3:.3g} after)",
           'peak allocated GiB': '-' if alloc is None else f'{alloc:.2f}', 'peak reserved GiB': '-' if reserved is None else f'{reserved:.2f}',
           f"goal <= {GOALS['peak_gib']:.2f} GiB (15 GB, reserved)": goal(None if reserved is None else reserved <= GOALS['peak_gib'], dry),
           'warm-up peak allocated GiB': '-' if warm_alloc is None else f'{warm_alloc:.2f}',
           'compilations (warm-up / timed)': f"{WATCH.n - len(late)} / {len(late)}", 'compile s': f'{WATCH.seconds:.1f}',
           'first step s': steps[0]['seconds'], 'masks ms': f"{s['mask_ms']:.1f}", 'set-up s': f'{setup_s:.1f}'}
    rep.add('## Result', '', md_table([row]), '',
            f"Pad {s['pad_frac']:.1%}; attended pairs per real token {s['pairs_per_tok']:.0f}; loss {s['loss_first']:.3f} -> {s['loss_last']:.3f} "
            f"over the timed steps. MFU as in bench/train.py (dense-equivalent: 6N + 12 n_layer d_model L per token; attended "
            f"pairs: the True entries of the batch's masks), divided by {'the spec peak' if spec else 'the measured matmul'}. "
            f"Summary slots of these batches on their own: {', '.join(map(str, sorted(set(own))))} (the Trainer pads each batch "
            f"to a multiple of {trainer.model.cfg.mask.summary_multiple}: a real run compiles once per distinct count)." +
            (f" Recompile reasons: {'; '.join(WATCH.reasons[:4])}." if WATCH.reasons else ''))
    if late:
        rep.add(f"**FAIL**: {len(late)} compilation(s) inside the timed steps ({', '.join(late[:6])}): the figures above include "
                "compile time." + (f" Reasons: {'; '.join(WATCH.reasons[-4:])}." if WATCH.reasons else ''))
        ok = False
    if dry: ok &= dry_flex_forward(c, batches, rep)
    return ok


def dry_flex_forward(c, batches: list, rep: Report) -> bool:
    """Dry run: what CPU allows of the GPU's step, flex masks through the compiled model: forward only (flex has no CPU
    backward), `aot_eager`, the same batches and padding; a compilation after the warm-up batches fails."""
    import torch
    from meloformer.model import MeloFormer, ModelConfig
    from meloformer.tokenizer import HIDTokenizer
    from meloformer.model import batch_to
    torch.manual_seed(0)
    model = MeloFormer(ModelConfig.from_size(c['size'], vocab_size=HIDTokenizer().vocab_size, attn_backend='flex')).eval()
    S, _ = fixed_summary_slots(model, batches, c['extra_slots'])
    forward = torch.compile(model, dynamic=False, backend='aot_eager')
    rows, late = [], []
    for i, batch in enumerate(batches):
        ids, meta, _ = batch_to(batch, 'cpu')
        at, t0 = WATCH.mark(), time.perf_counter()
        with torch.no_grad(): forward(ids, meta, model.build_masks(meta))
        got = WATCH.since(at)
        if i >= c['warmup']: late += got
        rows.append(dict(batch=f"{'warm-up' if i < c['warmup'] else 'timed'} {i + 1}", seconds=f'{time.perf_counter() - t0:.2f}',
                         compilations=len(got)))
    rep.add('## Flex forward, compiled (dry run)', '', f"The GPU step's flex path as far as CPU goes: a `{c['size']}` model with "
            f"`attn_backend='flex'`, its forward compiled (`aot_eager`), on the same batches with the summary slots padded to {S}; "
            "no backward (FlexAttention has none on CPU).", '', md_table(rows))
    if late: rep.add(f"**FAIL**: {len(late)} compilation(s) after the warm-up batches ({', '.join(late[:6])}).")
    return not late


# ---------------------------------------------------------------------------------------------- 3. attention
def item_attention(cfg, rep: Report, dry: bool) -> bool:
    "One layer's attention (both stages) forward + backward: flex vs dense causal sdpa vs the densified mask; mask build time."
    import torch
    import torch.nn.functional as F
    from meloformer.attention import MaskConfig, build_masks, attend
    from meloformer.tokenizer import HIDTokenizer
    from meloformer.data import demo_dataset, make_loader
    from meloformer.model import batch_to
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
    """meloformer.memory's estimator against measured steps, one row at a time (the release batch first), then the
    length finder's answer checked by measured steps: at most `max_probes`, each started only if the item's budget
    still covers the longest step measured so far."""
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
    f = dict(c['finder'])
    size, max_probes = f.pop('size'), f.pop('max_probes')
    rep.add(f"`compare_estimates` one row at a time ({kw['precision']}, {kw['backend']}, 2 eager training steps per row on the "
            f"demo corpus tiled to L; {'CPU: peak RSS of a fresh process' if dry else 'CUDA: max_memory_allocated'}), the release "
            f"batch first; then `find_max_seq_len` (the estimator's answer) checked by measured steps: at that length and the next "
            f"multiple, or down until one fits; at most {max_probes} probes, each started only if the item's time budget covers the "
            f"longest step measured so far. Goal: estimate within {GOALS['estimator_pct']:g}% of the measured peak. Memory in GiB.",
            '', '## Estimator vs measured', '')
    longest = [0.0]                     # seconds of the slowest measured row: what a next probe must have time for
    def measured(size, B, L) -> tuple[float | None, float]:
        "Peak GiB of a measured step (None: out of memory) and its seconds."
        t0 = time.perf_counter()
        try: peak = measure_step(size, B, L, dev, **kw)['peak_mb'] / 1024
        except torch.cuda.OutOfMemoryError: peak = None
        finally:
            if not dry: torch.cuda.empty_cache()
        dt = time.perf_counter() - t0; longest[0] = max(longest[0], dt)
        return peak, dt
    rows = []
    for size_, B, L in c['rows']:
        t0 = time.perf_counter()
        try: r = compare_estimates([(size_, B, L)], device=dev, **kw).iloc[0]
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(size=size_, batch=B, seq_len=L, measured_GiB='out of memory', seconds=f'{time.perf_counter() - t0:.1f}'))
        else:
            err = float(r.error_pct)
            rows.append(dict(size=size_, batch=B, seq_len=int(r.seq_len), measured_GiB=f'{r.measured_mb / 1024:.3f}',
                             estimated_GiB=f'{r.estimated_mb / 1024:.3f}', error_pct=f'{err:+.1f}',
                             goal=f"within {GOALS['estimator_pct']:g}%: {goal(abs(err) <= GOALS['estimator_pct'], dry)}",
                             seconds=f'{time.perf_counter() - t0:.1f}'))
        finally:
            if not dry: torch.cuda.empty_cache()
        longest[0] = max(longest[0], time.perf_counter() - t0)
        rep.rows(rows)
    if f['budget_gb'] is None:       # dry run: the budget the estimator gives a 1024-token step of this size
        f['budget_gb'] = round(estimate_memory(ModelConfig.from_size(size, vocab_size=HIDTokenizer().vocab_size), 1, 1024, **kw, device=dev)['total'] / 1024, 3)
    answer = find_max_seq_len(size, device=dev, measure=False, **f, **kw)['max_seq_len']
    mult, B, budget = f['multiple'], f['batch_size'], f['budget_gb']
    rep.add('## Longest sequence that fits', '', f"`find_max_seq_len('{size}', budget_gb={budget:g}, batch_size={B}, multiple={mult}, "
            f"max_len={f['max_len']})` (the estimator): **{answer}** tokens. Measured probes:", '')
    probes, fits, L, left = [], {}, max(answer, mult), ''
    while True:
        if len(probes) >= max_probes: left = f'probe cap ({max_probes}) reached'; break
        if time.time() + longest[0] + 10 > DEADLINE: left = "the item's budget left no time for another probe"; break
        peak, dt = measured(size, B, L)
        fits[L] = peak is not None and peak <= budget
        probes.append(dict(seq_len=L, measured_GiB='out of memory' if peak is None else f'{peak:.3f}', budget_GiB=f'{budget:g}',
                           fits='yes' if fits[L] else 'no', seconds=f'{dt:.1f}'))
        rep.rows(probes)
        if fits[L] and L + mult <= f['max_len'] and L + mult not in fits: L += mult     # does the next multiple fit too?
        elif not fits[L] and L - mult >= mult and L - mult not in fits: L -= mult       # too long: one multiple down
        else: break
    if not probes: rep.add('(none)')
    yes, no = [k for k, v in fits.items() if v], [k for k, v in fits.items() if not v]
    longest_fit, shortest_miss = max(yes, default=None), min(no, default=None)
    if longest_fit == answer and (shortest_miss == answer + mult or answer + mult > f['max_len']): verdict = 'the finder is exact'
    elif longest_fit is not None and longest_fit > answer: verdict = f'the finder is cautious: {longest_fit} fits'
    elif shortest_miss is not None and shortest_miss <= answer:
        verdict = f'the finder is optimistic: {shortest_miss} does not fit' + (f', {longest_fit} does' if longest_fit else '')
    else: verdict = 'undecided'
    rep.add(f"Verdict: {verdict}" + (f" ({left})." if left and verdict == 'undecided' else '.') + f" Budget {budget:g} GiB.")
    return True


# ---------------------------------------------------------------------------------------------- 5. generation
# the cache's fill position (`DecodeCache.length`, argument 1 of forward_cached behind its no_grad wrapper) changes at
# every step: compiled dynamic from the first call, not specialized on it and recompiled at the next step
DECODE_DYNAMIC_SOURCES = "L['args'][1].length"


def item_generate(cfg, rep: Report, dry: bool) -> bool:
    """Cached decoding (IncrementalDecoder) at a long context, eager and with the one-token step compiled. Each way
    decodes the same positions twice: an untimed pass (it compiles every shape and branch the steps meet: tokens
    that close a segment run the summary branch), then the timed pass; a compilation in the timed pass fails."""
    import torch
    import torch.compiler.config as compiler_config
    import meloformer.generate as mg
    from meloformer.tokenizer import HIDTokenizer
    from meloformer.model import MeloFormer, ModelConfig
    bg = load_bench('generate')
    c = cfg['generate']
    dev = 'cpu' if dry else 'cuda'
    ctx, n = c['ctx'], c['steps']
    tok = HIDTokenizer()
    ids = bg.stream(tok, ctx + n + 1)
    seg = tok.annotate(ids)['seg']
    closing = int(sum(seg[i] != seg[i - 1] and seg[i - 1] >= 0 for i in range(ctx, ctx + n)))   # steps that close a segment
    n_seg = int(seg.max()) + 2
    torch.manual_seed(0)
    model = MeloFormer(ModelConfig.from_size(c['size'], vocab_size=tok.vocab_size)).to(dev).eval()
    compiler_config.dynamic_sources = DECODE_DYNAMIC_SOURCES
    rep.add(f"`{c['size']}` (fp32, batch 1, `museformer` masks), a real token stream teacher forced: prefill {ctx} tokens (eager), "
            f"then {n} one-token steps through `IncrementalDecoder.feed` ({closing} of them close a segment and run the summary "
            f"branch), twice: an untimed pass, then the same positions timed. Compiled: `torch.compile(meloformer.generate."
            f"forward_cached, backend={c['backend']!r})` for the steps (the prefill stays eager), the cache position dynamic "
            f"(`torch.compiler.config.dynamic_sources`); any compilation in the timed pass fails the item." +
            (" Dry run: inductor's CPU code generation." if dry else ''), '', '## Tokens per second', '')
    eager_step = mg.forward_cached
    def decode(step_fn) -> tuple[float, float, int, list]:
        "Tokens/s of the timed pass, seconds of the untimed one, compilations in the untimed and in the timed pass."
        seconds, compiles = [], []
        for timed in (False, True):
            dec = mg.IncrementalDecoder(model, tok, 1, max_len=ctx + n + 8, max_segments=n_seg, device=dev)
            with torch.no_grad():
                dec.feed(ids[None, :ctx]); sync()
                mg.forward_cached = step_fn
                try:
                    at, t0 = WATCH.mark(), time.perf_counter()
                    for i in range(ctx, ctx + n): dec.feed(ids[None, i:i + 1])
                    sync(); seconds.append(time.perf_counter() - t0); compiles.append(WATCH.since(at))
                finally: mg.forward_cached = eager_step
        return n / seconds[1], seconds[0], len(compiles[0]), compiles[1]
    eager, eager_warm, _, _ = decode(eager_step)
    rows = [{'step': 'eager', 'tokens/s': f'{eager:,.1f}', 'vs eager': '1.00x', 'untimed pass s': f'{eager_warm:.2f}',
             'compilations (untimed / timed)': '-'}]
    rep.rows(rows)
    from torch._dynamo.utils import counters
    frames = counters['frames']['total']
    ok, note = True, ''
    try:
        compiled, warm, n_warm, late = decode(torch.compile(eager_step, backend=c['backend']))
        rows.append({'step': f"compiled ({c['backend']})", 'tokens/s': f'{compiled:,.1f}', 'vs eager': f'{compiled / eager:.2f}x',
                     'untimed pass s': f'{warm:.1f}', 'compilations (untimed / timed)': f'{n_warm} / {len(late)}'})
        if late:
            ok = False
            note = (f"**FAIL**: {len(late)} compilation(s) inside the timed steps ({', '.join(late[:6])}); the tokens/s above include "
                    "compile time." + (f" Reasons: {'; '.join(WATCH.reasons[-4:])}." if WATCH.reasons else ''))
        elif WATCH.reasons: note = f"Recompile reasons in the untimed pass (first 4): {'; '.join(WATCH.reasons[:4])}."
    except Exception as e:
        traceback.print_exc()
        rows.append({'step': 'compiled', 'tokens/s': 'not available', 'vs eager': '-', 'untimed pass s': '-',
                     'compilations (untimed / timed)': f'{WATCH.n} / -'})
        ok = False                                    # a check that cannot compile the step has failed, not passed
        note = f"Compiling the one-token step failed with the current code: `{first_line(e)}`."
    rep.rows(rows)
    if note: rep.add(note)
    if counters['frames']['total'] == frames:        # the check itself is out of date: fail, do not report eager as compiled
        raise RuntimeError("the compiled step was never called: IncrementalDecoder.feed no longer calls meloformer.generate.forward_cached")
    return ok


# ---------------------------------------------------------------------------------------------- runner
TITLES = dict(gpu_cells='the `#| gpu` notebook cells', train='training throughput', attention='attention forward + backward',
              memory='memory estimator and length finder', generate='cached generation')
DRY_BACKEND = 'aot_eager'              # dry run: torch.compile's backend where a call names none (dynamo and AOTAutograd
                                       # trace as on the GPU, no code generation: a short dry run); `inductor_in_dry_run` below


@contextlib.contextmanager
def inductor_in_dry_run():
    "Dry run: what is compiled inside this block (a `Trainer`'s model) is compiled by inductor, as on the GPU."
    global DRY_BACKEND
    before, DRY_BACKEND = DRY_BACKEND, 'inductor'
    try: yield
    finally: DRY_BACKEND = before


def run_item(item: str, out_dir: Path, dry: bool, run_id: str, deadline: float) -> int:
    "In a child process: one item, its report; exit 0 (passed), 1 (a check failed) or 3 (the item raised)."
    global WATCH, DEADLINE
    t0, DEADLINE = time.perf_counter(), deadline
    import torch
    torch.manual_seed(0)
    if dry:
        import functools
        import torch._inductor.config as inductor_config
        compile_ = torch.compile
        torch.compile = functools.wraps(compile_)(lambda *args, **kw: compile_(*args, **{'backend': DRY_BACKEND, **kw}))
        inductor_config.cpp.vec_isa_ok = False   # scalar C++: the same lowering; no vector-ISA probe builds, a shorter compile
    WATCH = CompileWatch()
    rep = Report(out_dir / f'{item}.md', TITLES[item], dry, 'cpu' if dry else f'cuda ({torch.cuda.get_device_name()})', run_id)
    try: ok = globals()[f'item_{item}'](CONFIG['dry' if dry else 'gpu'], rep, dry)
    except Exception as e:
        traceback.print_exc()
        rep.add(f"**ERROR** after {time.perf_counter() - t0:.0f} s: `{first_line(e)}` (traceback in the log)."); ok = None
    rep.add(f"Item time {time.perf_counter() - t0:.0f} s; {WATCH.line()}." + ('' if ok or ok is None else ' **A check FAILED** (see above).'))
    (out_dir / 'logs' / f'{item}.json').write_text(json.dumps(dict(run_id=run_id, compile_s=round(WATCH.seconds, 1), compilations=WATCH.n, **WATCH.cache())))
    return 0 if ok else 3 if ok is None else 1


def stop(p: subprocess.Popen) -> str:
    "End an item over its budget and whatever it started (compile workers, loaders): '' when it is gone, else why not."
    for sig, grace_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try: os.killpg(p.pid, sig)
        except ProcessLookupError: pass
        try: p.wait(timeout=grace_s); return ''
        except subprocess.TimeoutExpired: continue
    return f"process {p.pid} still there 30 s after SIGKILL (stuck in the kernel or the driver); left behind"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true', help="run every item on CPU with tiny sizes and short lengths (CI)")
    p.add_argument('--items', nargs='+', choices=ITEMS, default=ITEMS, help="items to run, in the given order (default: all)")
    p.add_argument('--out_dir', default=None, help="where <item>.md, summary.md, logs/ and compile_cache/ go (default: "
                   "bench/results/gpu; dry run: a new temp folder); delete compile_cache/ there for a cold run")
    p.add_argument('--budgets', nargs='+', default=[], metavar='ITEM=SECONDS', help="override an item's time budget, e.g. train=300 "
                   f"(defaults: GPU {', '.join(f'{k} {v}' for k, v in BUDGET_GPU.items())}; dry run "
                   f"{', '.join(f'{k} {v}' for k, v in BUDGET_DRY.items())}, gpu_cells 300 with --rehearse)")
    p.add_argument('--total_s', type=float, default=None, help=f"budget of the whole run (default: {TOTAL_GPU} s on GPU, {TOTAL_DRY} s dry)")
    p.add_argument('--rehearse', action='store_true', help="dry run: also run the gpu notebook cells on CPU (device 'cpu', tiny "
                   "model, lengths 256) up to their first flex backward (~20 s more; CI does)")
    p.add_argument('--_child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--_run_id', default=None, help=argparse.SUPPRESS)
    p.add_argument('--_deadline', type=float, default=None, help=argparse.SUPPRESS)
    return p


def write_summary(out: Path, dry: bool, run_id: str, start: float, total: float, rows: list[dict], pending: list[str]):
    "summary.md after every item: a check stopped half way still says which items it finished."
    lines = [f"# GPU check{' (CPU dry run)' if dry else ''}", '', f"{machine('cpu' if dry else 'cuda')}; run `{run_id}`.", '',
             f"{'Whole run' if not pending else 'So far'} {time.perf_counter() - start:.0f} s (budget {total:.0f} s)" +
             (f"; not yet run: {', '.join(pending)}" if pending else '') + '.', '', md_table(rows) if rows else '(no item finished yet)']
    others = []
    for md in sorted(out.glob('*.md')):
        if md.stem in ITEMS and md.stem not in {r['item'] for r in rows} and md.stem not in pending:
            m = re.search(r'run `([^`]+)`', md.read_text())
            others.append(f"`{md.name}` (run `{m.group(1) if m else '?'}`)")
    if others: lines += ['', f"Item files of earlier runs in this folder, not this run's: {', '.join(others)}."]
    (out / 'summary.md').write_text('\n'.join(lines) + '\n')


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    global REHEARSE
    REHEARSE = a.rehearse
    if a.rehearse and not a.dry_run:
        print("gpu_check.py: --rehearse goes with --dry-run (on a GPU the cells run for real)", file=sys.stderr); return 2
    if a._child: return run_item(a._child, Path(a.out_dir), a.dry_run, a._run_id or '?', a._deadline or float('inf'))
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
    run_id = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    cache = (out / 'compile_cache').resolve()
    # one compile cache for every item (and the next run): what an item compiled, a later one loads
    cache_env = dict(TORCHINDUCTOR_CACHE_DIR=str(cache / 'inductor'), TRITON_CACHE_DIR=str(cache / 'triton'),
                     TORCHINDUCTOR_FX_GRAPH_CACHE='1', TORCHINDUCTOR_AUTOGRAD_CACHE='1')
    total = a.total_s or (TOTAL_DRY if a.dry_run else TOTAL_GPU)
    print(f"GPU check{' (CPU dry run)' if a.dry_run else ''} run {run_id}: items {', '.join(a.items)}; results in {out}; compile cache "
          f"{cache}; budgets {', '.join(f'{i} {budgets[i]:.0f} s' for i in a.items)}, whole run {total:.0f} s", flush=True)
    start, summary = time.perf_counter(), []
    write_summary(out, a.dry_run, run_id, start, total, summary, list(a.items))
    for k, item in enumerate(a.items):
        left = total - (time.perf_counter() - start)
        budget = min(budgets[item], left)
        md, log = out / f'{item}.md', out / 'logs' / f'{item}.log'
        for stale in (md, md.with_suffix('.md.tmp'), out / 'logs' / f'{item}.json'): stale.unlink(missing_ok=True)
        if left < 15:
            set_status(md, TITLES[item], 'SKIPPED (no time left in the whole run)', run_id, 'cpu' if a.dry_run else 'cuda')
            summary.append(dict(item=item, status='SKIPPED (no time left in the whole run)', seconds='0', file=md.name)); continue
        print(f"== {item} (budget {budget:.0f} s, log {log})", flush=True)
        t0, problem = time.perf_counter(), ''
        with open(log, 'w') as lf:
            cmd = ([sys.executable, __file__, '--_child', item, '--out_dir', str(out), '--_run_id', run_id, '--_deadline', str(time.time() + budget)]
                   + (['--dry-run'] if a.dry_run else []) + (['--rehearse'] if a.rehearse else []))
            # dry run: one thread per process; two OpenMP threads on two cores that other work shares made a tiny step ~4-70x slower
            env = {**os.environ, **cache_env, **({'OMP_NUM_THREADS': '1'} if a.dry_run else {})}
            p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
            try: rc = p.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                rc, problem = None, stop(p)
        dt = time.perf_counter() - t0
        status = ('pass' if rc == 0 else f'CUT after {dt:.0f} s (budget {budget:.0f} s)' if rc is None else 'FAIL' if rc == 1
                  else 'ERROR (the item raised)' if rc == 3 else f'ERROR (exit {rc})')
        if problem: status += f'; {problem}'
        detail = {'CUT': 'over its budget; the figures in this file are those finished before the cut',
                  'FAIL': 'a check failed (see above)', 'ERROR (the item': 'see the error above and logs/' + item + '.log',
                  'ERROR (exit': f'the process ended abnormally (see logs/{item}.log)'}
        set_status(md, TITLES[item], status + next((f': {v}' for k_, v in detail.items() if status.startswith(k_)), ''), run_id,
                   'cpu' if a.dry_run else 'cuda')
        if rc != 0:
            tail = log.read_text(errors='replace').splitlines()[-25:]
            print(f"-- {item}: {status}; last lines of {log}:", *('   ' + l for l in tail), sep='\n', flush=True)
        stats = out / 'logs' / f'{item}.json'
        st = json.loads(stats.read_text()) if stats.exists() else {}
        summary.append(dict(item=item, status=status, seconds=f'{dt:.0f}',
                            **{'compile s (compilations)': f"{st['compile_s']} ({st['compilations']})" if st else '-',
                               'FX graph cache hit / miss': f"{st['fx_hit']} / {st['fx_miss']}" if st else '-'}, file=md.name))
        print(f"-- {item}: {status} in {dt:.0f} s -> {md}", flush=True)
        write_summary(out, a.dry_run, run_id, start, total, summary, list(a.items[k + 1:]))
    table = md_table(summary)
    print(f"\n{table}\n\nwhole run {time.perf_counter() - start:.0f} s; files in {out}", flush=True)
    return 0 if all(r['status'] == 'pass' for r in summary) else 1


if __name__ == '__main__': sys.exit(main())
