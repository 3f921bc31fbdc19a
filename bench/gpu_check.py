"""The GPU path in one prepared check: the `gpu` notebook cells, training throughput, attention, memory, generation.

    python bench/gpu_check.py                        # on one CUDA device: every item in order, 9 minutes at most
    python bench/gpu_check.py --items train memory   # some items only
    python bench/gpu_check.py --dry-run              # the same items through the same code on CPU, tiny sizes (CI)
    python bench/gpu_check.py --summarize DIR        # rebuild DIR/summary.md from the item files in DIR
    bash bench/gpu_device.sh "$OUT"                  # on the GPU machine: wheels, nvidia-smi, this check, results to $OUT

Items, in order, each run in its own process (the repository first on its PYTHONPATH) with its own time budget (an
item over its budget is cut and reported as cut; the others still run):

1. `gpu_cells`: the `#| gpu` cells of the notebooks (flex forward + backward against the sdpa reference, the model
   loaded onto the GPU), each with the definitions it needs from its notebook. The compiled bf16 training step of
   `small` at L = 8192 (03_model) is left to `train`, which compiles and times that step (`DUPLICATE_OF_TRAIN`).
2. `train`: training throughput of `small` at L = 8192, batch 6, compiled, bf16, flex (bench/train.py's `Run`:
   the real `Trainer.train_step`), the summary slots padded to one bound so the compiled step keeps one shape:
   tokens/s, MFU against the device's spec bf16 peak (dense-equivalent and attended pairs; a measured matmul
   beside it), peak memory of the timed steps, compilations (the item fails if any happens after the warm-up).
3. `attention`: forward + backward of one layer's attention at L = 8192 and 24576: `museformer` flex vs dense
   causal flash attention (sdpa `is_causal`) first (the goal rows), then the same mask densified (sdpa) and the
   block-mask build time per batch, each started only while the item's budget covers it.
4. `memory`: `meloformer.memory`'s estimator against the measured peak of the release batch (6 x 8192), then
   `find_max_seq_len`'s answer for that batch within 15 GB checked by measured steps (the release row is the
   first probe's measurement when the answer is 8192), then more sizes and lengths, each started only while
   the item's budget covers it.
5. `generate`: cached generation tokens/s of `small` at a 4k context, eager and with the one-token step compiled
   (`IncrementalDecoder.compile_step`: two graphs, a step that closes no segment and one that closes one); an
   untimed pass over the same positions compiles them first, and a compilation inside the timed steps fails.

Each item writes `<out_dir>/<item>.md` as it measures, row by row (run id, machine, GPU, driver, torch, date in its
header; its status, written by the runner when the item ends: pass, FAIL, CUT, ERROR or STOPPED; goals beside the
figures; memory in GiB; a last line holding the item's record for the summary), and the runner rebuilds
`<out_dir>/summary.md` after every item from all the item files in the folder: the latest run of each item, with its
run id and date, and a goal table (target, measured, goal met) apart from the items' status. With `--export DIR`
the item files, summary.md and logs.tar.gz are copied into DIR as they are written (the GPU machine returns only
that folder: at most 8 files). All items share one compile cache (`--cache_dir`; inductor's FX graph and
AOTAutograd caches, Triton's kernels): a graph met again (a recompile, the next run) is loaded, not compiled. The
runner itself never starts CUDA (a probe process reports the device); it ends its items' processes, and what they
started, when it exits or gets SIGTERM, SIGINT or SIGHUP. The exit status is non-zero when an item fails, errors
or is cut.

`--dry-run` runs every item on CPU with tiny sizes and short lengths, writing the same files to a temp folder
(CI runs it so that a change that breaks the GPU check breaks CI): FlexAttention forward only (it has no CPU
backward), training steps on the sdpa backend; the `train` steps and the one-token `generate` step are compiled
by inductor (its CPU code generation, so the lowering the GPU also goes through is exercised), the other
compiles use the `aot_eager` backend to keep the dry run short.
"""
import argparse, ast, atexit, contextlib, datetime, importlib.util, io, json, logging, os, platform, re, signal
import statistics, subprocess, sys, symtable, tarfile, tempfile, time, traceback, types, uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / 'results' / 'gpu'
ITEMS = ['gpu_cells', 'train', 'attention', 'memory', 'generate']
TITLES = dict(gpu_cells='the `#| gpu` notebook cells', train='training throughput', attention='attention forward + backward',
              memory='memory estimator and length finder', generate='cached generation')
GiB = 2 ** 30

# ---------------------------------------------------------------------------------------------- time budgets
# What each GPU item costs, in seconds, on an H100-class GPU with a cold compile cache: estimates from these unit
# costs, made before the first GPU run (2026-11-30, H200: a cold flex shape took ~26 s there; bench/README.md).
# START: a new Python process importing torch and meloformer and starting CUDA. FLEX:
# FlexAttention compiled forward and backward for one new shape (each stage of a layer, at each batch, head count,
# length and dtype, is one; 15-20 s). MODEL: inductor's cold compile of the whole `small` training step, its flex
# kernels aside (60-90 s). DECODE: the 8-layer one-token decode graph, forward only (~35 s cold; the second graph,
# the step that closes a segment, reuses most of its kernels, ~15 s).
START, FLEX, MODEL, DECODE = 10, 17, 75, 35
ESTIMATE_GPU = dict(
    gpu_cells=[('start', START), ('the definitions the cells read (tokenizing, a tiny model saved)', 8),
               ('02_attention: flex vs sdpa gradients, 2 flex shapes, block masks', 2 * FLEX + 4),
               ('03_model: the model loaded onto the GPU', 3),
               ('03_model: model gradients flex vs sdpa, 2 flex shapes (other heads), block masks', 2 * FLEX + 4)],
    train=[('start', START), ('Trainer, 10 batches drawn', 10), ('matmul anchor, twice', 3),
           ('first step: the model compiled, 2 flex shapes', MODEL + 2 * FLEX), ('1 + 8 steps, pair counts of the batches', 14)],
    attention=[('start, a long piece tokenized', START + 5), ('L = 8192: block masks, 2 flex shapes, causal (goal row)', 2 * FLEX + 4),
               ('L = 24576: block masks, 2 flex shapes, causal (goal row)', 2 * FLEX + 6),
               ('densified masks, block-mask build times (paced: only while the budget covers them)', 10)],
    memory=[('start', START), ('the release row 6 x 8192: 2 flex shapes, 2 eager steps', 2 * FLEX + 6),
            ("the finder's estimate (further probes and rows: paced)", 2)],
    generate=[('start, model, token stream', START + 3), ('eager: two passes of prefill + 64 steps', 5),
              ('compile_step: its 2 graphs', DECODE + 15), ('timed pass', 2)],
)
# the budgets: each estimate with ~10% over it; their sum leaves TOTAL_GPU - sum (25 s) for the probe, process ends,
# exports. Time an item leaves unused is carried to the next (its paced parts may use it).
BUDGET_GPU = dict(gpu_cells=105, train=160, attention=110, memory=60, generate=80)
TOTAL_GPU = 540
# dry run (CPU): the measured times are ~15-50 s an item on one idle core; a cut fails CI, so generous
BUDGET_DRY = dict(gpu_cells=90, train=150, attention=90, memory=90, generate=150)
TOTAL_DRY = 600
REHEARSE_EXTRA = "~10 s more"                       # --rehearse: what it adds to the dry run (8 s measured on a near-idle
                                                    # 2-core machine, 14 s on a loaded one); README.md says the same
REHEARSE_BUDGET = 60                                # and what it adds to gpu_cells' dry-run budget
REHEARSE = False                                    # --rehearse (dry run): run the gpu cells on CPU too
assert all(BUDGET_GPU[k] >= sum(s for _, s in ESTIMATE_GPU[k]) for k in ITEMS), 'a GPU budget under its estimate'
assert sum(BUDGET_GPU.values()) <= TOTAL_GPU - 20, 'the GPU budgets leave no margin in the whole run'

# ---------------------------------------------------------------------------------------------- goals
# goals of bench/README.md; the memory goal is 15 GB (1e9 bytes), reported in GiB as every memory figure here
GOALS = dict(tokens_per_s=300_000, peak_gib=15e9 / GiB, speedup_8192=1.5, speedup_24576=3.0, estimator_pct=20.0)
GOAL_ROWS = [    # key, the item that measures it, what, target
    ('tokens_per_s', 'train', 'training throughput, `small` at L = 8192, batch 6, compiled, bf16, flex', '>= 300,000 tokens/s'),
    ('peak_gib', 'train', 'peak memory of that step (reserved)', f"<= 15 GB ({GOALS['peak_gib']:.2f} GiB)"),
    ('speedup_8192', 'attention', 'museformer flex vs dense causal (sdpa), forward + backward, L = 8192', '>= 1.5x faster'),
    ('speedup_24576', 'attention', 'museformer flex vs dense causal (sdpa), forward + backward, L = 24576', '>= 3x faster'),
    ('estimator', 'memory', 'memory estimator vs measured peak, every measured row (the release batch first)', 'within 20%'),
    ('generate', 'generate', 'cached generation of `small` at a 4k context, eager vs the compiled step', 'both measured, no compile in the timed steps'),
]
# dense bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (without sparsity), matched in order on the
# upper-cased device name; None (and any name not listed): MFU against the matmul measured in the same run instead
SPEC_BF16_TFLOPS = ((('H100', 'PCIE'), 756), (('H800', 'PCIE'), 756), (('NVL',), None),
                    (('H100',), 989), (('H200',), 989), (('H800',), 989), (('A100',), 312), (('L40S',), 362))

# what each item runs: GPU sizes, and the dry run's tiny stand-ins (same code paths)
CONFIG = dict(
    # workers 0: the demo corpus gives 7 batches of 6 x 8192 per epoch, and each new epoch would start new loader
    # workers inside a timed step; collating a batch in the main process takes ~1 ms
    gpu=dict(train=dict(size='small', L=8192, batch=6, warmup=2, steps=8, workers=0, anchor_n=8192, anchor_repeats=10, extra_slots=0),
             attention=dict(lengths=(8192, 24576), heads=6, head_dim=64, dtype='bfloat16', repeats=(10, 5), build_batch=6),
             # the release batch first; the finder for that batch within 15 GB: its probe at 8192 is the release row
             memory=dict(rows=[('small', 6, 8192)], extra_rows=[('base', 1, 8192), ('small', 1, 16384), ('base', 1, 16384)],
                         finder=dict(size='small', batch_size=6, budget_gb=round(GOALS['peak_gib'], 2), multiple=8192,
                                     max_len=65536, max_probes=2)),
             generate=dict(size='small', ctx=4096, steps=64, backend='inductor')),
    # extra_slots: the dry run's short rows all have the same summary count; one multiple more gives every batch unused
    # slots, as most batches have on the GPU (where the largest count sets the bound)
    dry=dict(train=dict(size='tiny', L=256, batch=2, warmup=2, steps=2, workers=0, anchor_n=512, anchor_repeats=3, extra_slots=64),
             attention=dict(lengths=(128, 256), heads=2, head_dim=32, dtype='float32', repeats=(2, 2), build_batch=1),
             memory=dict(rows=[('tiny', 1, 1024)], extra_rows=[('tiny', 2, 512)],
                         finder=dict(size='tiny', batch_size=1, budget_gb=None, multiple=128, max_len=4096, max_probes=2)),
             generate=dict(size='tiny', ctx=4096, steps=12, backend='inductor')))   # the GPU's context: 4 demo pieces' ends


# ---------------------------------------------------------------------------------------------- reports
def machine(device: str) -> str:
    "CPU, GPU, driver, CUDA, torch, Python and date: the header line of every result file (in an item's process)."
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    gpu = 'none'
    if device != 'cpu' and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / GiB:.0f} GiB"
    return (f"{cpu}, {os.cpu_count()} cores; GPU: {gpu}; driver {nvidia_driver()}, CUDA {torch.version.cuda or 'none'}; "
            f"torch {torch.__version__}, Python {platform.python_version()}; {datetime.datetime.now():%Y-%m-%d %H:%M}; device measured: {device}")


def nvidia_driver() -> str:
    try:
        return subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError): return 'none'


def md_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    return '\n'.join(lines + ['| ' + ' | '.join(str(r.get(c, '')).replace('|', '\\|') for c in cols) + ' |' for r in rows])


def goal(ok: bool | None, dry: bool) -> str:
    "The goal column: met / NOT met, or n/a in the dry run (CPU figures say nothing about a GPU)."
    return 'n/a (dry run)' if dry else '-' if ok is None else 'met' if ok else 'NOT met'


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def write_atomic(path: Path, text: str):
    "Write `path` whole or not at all (a temp file beside it, then a rename)."
    tmp = path.with_name(path.name + '.part')
    tmp.write_text(text); os.replace(tmp, path)


STATUS_RUNNING = '**Status: running**'
RECORD = '<!-- gpu_check record: '          # the last line of an item's file: its record (JSON) for summary.md
EXPORT: Path | None = None                  # --export: a folder every item file is mirrored into as it is written
STATS: Path | None = None                   # the item's stats file (logs/<item>.json): compile counts, goals


class Report:
    """One item's markdown file, rewritten atomically after every addition (and mirrored into `EXPORT`): a cut item
    keeps what it finished. The status line under the machine line says `running` until the runner writes how the
    item ended. `goal()` records a goal's figure for summary.md as soon as it is measured."""
    def __init__(self, path: Path, title: str, dry: bool, device: str, run_id: str):
        self.path, self.dry, self.goals, self.tables = path, dry, {}, []
        self.parts = [f"# GPU check: {title}", '', machine(device) + f"; run `{run_id}`.", '',
                      STATUS_RUNNING + f" (run `{run_id}`; still here: the whole check was stopped during this item).", '',
                      '**CPU dry run**: tiny sizes, short lengths; the figures check the code path, not the GPU goals.' if dry
                      else 'One CUDA device; goals beside the figures; memory in GiB (2^30 bytes).']
        self.write()

    def add(self, *lines: str):
        self.parts += ['', *lines]; self.write()
        print(*lines, sep='\n', flush=True, file=sys.__stdout__)       # not to a cell's redirected stdout

    def rows(self, rows: list[dict], new: bool = True):
        """A table that grows row by row (or whose rows change): the file always holds it whole, where it first went;
        the console gets the newest row (`new`) or the table's last row."""
        table = md_table(rows)
        at = next((i for t, i in self.tables if t is rows), None)
        if at is None:
            self.parts += [table] if self.parts[-1] == '' else ['', table]
            self.tables.append((rows, len(self.parts) - 1))
        else: self.parts[at] = table
        self.write()
        print(table if at is None else table.splitlines()[-1], flush=True, file=sys.__stdout__)

    def write(self):
        text = '\n'.join(self.parts) + '\n'
        write_atomic(self.path, text)
        if EXPORT: write_atomic(EXPORT / self.path.name, text)

    def goal(self, key: str, measured: str, met: bool | None):
        "A goal's figure, for summary.md's goal table (met None: not decided; the dry run decides none)."
        self.goals[key] = dict(measured=measured, met=None if self.dry else met)
        save_stats(goals=self.goals)


def save_stats(**kw):
    "The item's stats file, merged: what the runner puts in the item's record (it survives a cut)."
    if STATS is None: return
    old = json.loads(STATS.read_text()) if STATS.exists() else {}
    write_atomic(STATS, json.dumps({**old, **kw}))


def load_bench(name: str):
    "A sibling benchmark script (bench/<name>.py) as a module, so its functions are reused, not copied."
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCH / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


class CompileWatch:
    """Every compilation in this process: dynamo's frames and AOTAutograd's lazily compiled backward graphs, from
    dynamo's compile callbacks, with their seconds; the failed guard of each recompilation, from its `recompiles` log
    (kept, not printed). `mark()` then `since(mark)`: the compilations in a window (a timed window must have none).
    Every torch internal used here is optional: where this torch lacks one, `notes` says what stands in for it (dynamo's
    frame counter for the callbacks) or what is not reported, and nothing fails for it."""
    def __init__(self):
        import torch
        self.starts, self.seconds, self.reasons, self._open, self.resets, self.notes = [], 0.0, [], [], 0, []
        self.cb = None
        try:
            import torch._dynamo.callback as cb
            cb.callback_handler.register_start_callback(self._start)
            cb.callback_handler.register_end_callback(self._end)
            self.cb = cb
        except Exception as e:
            self.notes.append(f"dynamo's compile callbacks are not there ({first_line(e)}): compilations counted from "
                              "dynamo's frame counter, without their seconds")
        try:
            torch._logging.set_logs(recompiles=True)
            logging.getLogger('torch._dynamo.guards.__recompiles').addFilter(self._reason)
        except Exception as e: self.notes.append(f"recompile reasons not reported ({first_line(e)})")
        if self._frames() is None: self.notes.append("dynamo's frame counter is not there: frames converted while a reset "
                                                     "had dropped the callbacks are not counted")
        if self.cb is None and self._frames() is None:
            self.notes.append('**compilations cannot be counted with this torch: the no-compile-in-a-timed-window checks are off**')

    # called by torch inside its compile: never raise there; older torch calls them without arguments
    def _start(self, args=None):
        trigger = getattr(getattr(args, 'callback_trigger', None), 'name', 'dynamo' if args is None else 'compile')
        self.starts.append(f"{getattr(args, 'compile_id', '?')} ({str(trigger).lower().replace('_', ' ')})")
        self._open.append(time.perf_counter())

    def _end(self, args=None):
        if self._open: self.seconds += time.perf_counter() - self._open.pop()

    def _reason(self, rec) -> bool:
        try:
            why = next((l.strip() for l in rec.getMessage().splitlines() if l.strip().startswith('- ')), '?')
            self.reasons.append(why.split('#')[0].strip(' -') or why)     # the failed guard, without the source comment
        except Exception: pass
        return False

    @staticmethod
    def _counter(group: str, key: str) -> int | None:
        try:
            from torch._dynamo.utils import counters
            return int(counters[group][key])
        except Exception: return None

    def _frames(self) -> int | None:
        "Frames dynamo converted (skipped ones too), from its counters: they survive `torch._dynamo.reset()`, which drops callbacks."
        return self._counter('frames', 'total')

    def _ensure(self):
        "Callbacks dropped by a `torch._dynamo.reset()` are registered again (and the reset counted)."
        if self.cb is None: return
        try:
            if self._start not in self.cb.callback_handler.start_callbacks:
                self.cb.callback_handler.register_start_callback(self._start); self.cb.callback_handler.register_end_callback(self._end)
                self.resets += 1
        except AttributeError: pass                   # no list to look into: assume they are still registered

    @property
    def n(self) -> int: return len(self.starts) if self.cb is not None else (self._frames() or 0)

    def mark(self) -> tuple:
        self._ensure(); return len(self.starts), self._frames(), self.resets

    def since(self, mark: tuple) -> list[str]:
        "The compilations after `mark`; where a reset dropped the callbacks meanwhile (or there are none), dynamo's frame count stands in."
        self._ensure()
        frames = self._frames()
        if self.cb is None:
            return ['a frame (from dynamo\'s frame counter)'] * max((frames or 0) - (mark[1] or 0), 0)
        seen = self.starts[mark[0]:]
        if self.resets == mark[2] or frames is None or mark[1] is None: return seen
        unseen = frames - mark[1] - sum('(dynamo)' in s for s in seen)
        return seen + ['? (a frame converted while a reset had dropped the callbacks)'] * max(unseen, 0)

    def cache(self) -> dict:
        "FX graph and AOTAutograd cache hits and misses so far (the shared compile cache at work); None where not counted."
        return dict(fx_hit=self._counter('inductor', 'fxgraph_cache_hit'), fx_miss=self._counter('inductor', 'fxgraph_cache_miss'),
                    aot_hit=self._counter('aot_autograd', 'autograd_cache_hit'), aot_miss=self._counter('aot_autograd', 'autograd_cache_miss'))

    def line(self) -> str:
        c = {k: 'n/a' if v is None else v for k, v in self.cache().items()}
        return (f"{self.n} compilation(s), {self.seconds:.1f} s; compile cache: FX graphs {c['fx_hit']} hit / {c['fx_miss']} "
                f"missed, AOTAutograd {c['aot_hit']} hit / {c['aot_miss']} missed" + ''.join(f'; {n}' for n in self.notes))

    def save(self):
        save_stats(compile_s=round(self.seconds, 1), compilations=self.n, **self.cache(), notes=self.notes)


WATCH: CompileWatch | None = None      # the item's, set up by run_item before the item starts
DEADLINE = float('inf')                # time.time() by which the runner cuts the item (its budget): items that pace themselves


def time_left() -> float: return DEADLINE - time.time()


ITEM_T0 = time.perf_counter()          # reset when an item's process starts its item


def stage(what: str):
    "A timestamped line in the item's log as each stage starts: a cut item's log says where its time went."
    print(f"[{time.perf_counter() - ITEM_T0:6.1f} s] {what}", flush=True)


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
# the gpu cell that `train` stands in for on the GPU (matched on its notebook and its text): the compiled bf16 step of
# `small` at 8192 compiles the whole model (~60-90 s cold), and `train` compiles and times that step (batch 6, through
# the Trainer) right after; the two are different graphs, so running both costs a second cold compile the 9 minutes do
# not hold. The dry run checks the cell still exists (and --rehearse runs it on CPU).
DUPLICATE_OF_TRAIN = ('03_model.ipynb', 'one compiled bf16 training step of `small`')


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


def side_effect(st: str) -> bool:
    "A statement that binds nothing and is a call (`model.save_pretrained(folder)`), not a test, an assert or a display."
    node = ast.parse(st).body[0]
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)): return False
    f = node.value.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ''
    return not name.startswith(('test_', 'display', 'show'))


def gpu_plan(nb_path: Path, skip_flags=('slow',)) -> dict:
    """The `gpu` cells of a notebook and the statements of earlier cells that define what they read (found by
    name, recursively: imports, helper functions, sample files), in notebook order, with the calls among them that
    act on what they define (a model saved to the folder a gpu cell loads from). Cells nbdev_test would skip (other
    flags, `eval: false`) are not used."""
    import builtins
    cells = json.loads(nb_path.read_text())['cells']
    code = [(i, ''.join(c['source'])) for i, c in enumerate(cells) if c['cell_type'] == 'code']
    gpu = [(i, s) for i, s in code if 'gpu' in directives(s)[0]]
    if not gpu: return dict(gpu=[], prereq=[], missing=set())
    first = gpu[0][0]
    defs = {}                                        # name -> (cell, statement index): the latest before the first gpu cell
    stmts, latest_before = {}, {}                    # key -> (source, free names); key -> {name: key of its latest def}
    for i, s in code:
        flags, opts = directives(s)
        if i >= first or flags & set(skip_flags) or opts.get('eval', '').lower() == 'false': continue
        try: parts = statements(s)
        except SyntaxError: continue                # IPython magics: nothing a gpu cell can import from
        for j, st in enumerate(parts):
            b, f = bound_and_free(st)
            stmts[(i, j)] = (st, f)
            latest_before[(i, j)] = {n: defs[n] for n in f if n in defs}
            for name in b: defs[name] = (i, j)
    need, later_gpu_defs = set(), set()
    for i, s in gpu:
        b, f = bound_and_free(s)
        need |= f - later_gpu_defs; later_gpu_defs |= b
    chosen, missing = set(), set()
    def resolve(todo):
        while todo:
            name = todo.pop()
            if name in defs:
                key = defs[name]
                if key not in chosen: chosen.add(key); todo += list(stmts[key][1])
            elif not hasattr(builtins, name) and name in need: missing.add(name)
    resolve(list(need))
    # methods added with fastcore's `@patch` (`def forward(self: MeloFormer, ...)`) bind a name nothing reads: take each
    # one whose class (or anything else it reads) a chosen statement defines
    patches, grew = {k for k, (st, f) in stmts.items() if st.lstrip().startswith('@patch')}, True
    while grew:
        grew = False
        for k in sorted(patches - chosen):
            if any(latest_before[k].get(n) in chosen for n in stmts[k][1]):
                chosen.add(k); grew = True; resolve(list(stmts[k][1]))
    # calls that act on what a gpu cell reads (a model saved to the folder it loads from): each name such a call reads
    # defined, at that point, by a chosen statement, and one of them, not a module, read by a gpu cell
    imported = {k for k, (st, f) in stmts.items() if isinstance(ast.parse(st).body[0], (ast.Import, ast.ImportFrom))}
    effects = {k for k, (st, f) in stmts.items() if k not in chosen and f and side_effect(st)
               and all(n in latest_before[k] and latest_before[k][n] in chosen or hasattr(builtins, n) for n in f)
               and any(n in need and n in latest_before[k] and latest_before[k][n] not in imported for n in f)}
    return dict(gpu=gpu, prereq=[(k, stmts[k][0]) for k in sorted(chosen | effects)], missing=missing,
                gpu_defs=later_gpu_defs, effects=len(effects))


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
    src = re.sub(r'\.cuda\(\)', '.cpu()', src)
    src = re.sub(r"""(['"])(small|base|large|xlarge)\1""", "'tiny'", src)
    src = re.sub(r'(?<![\w.])\d{4,}(?![\w.])', lambda m: '256' if int(m.group()) >= 1024 else m.group(), src)
    return re.sub(r'torch\.cuda\.(synchronize|max_memory_allocated|max_memory_reserved|reset_peak_memory_stats|empty_cache)\(\)', '0', src)


FLEX_NO_CPU_BACKWARD = 'FlexAttention does not support backward on CPU'


class RowTee(io.TextIOBase):
    "A running cell's stdout: to the log, and line by line into its row (the report rewritten as each line comes)."
    def __init__(self, on_line):
        self.buf, self.lines, self.on_line, self.busy = '', [], on_line, False

    def write(self, s: str) -> int:
        sys.__stdout__.write(s)
        if self.busy: return len(s)                  # what updating the row prints is not the cell's
        self.buf += s
        while '\n' in self.buf:
            line, self.buf = self.buf.split('\n', 1)
            if line.strip():
                self.lines.append(line.strip()); self.busy = True
                try: self.on_line(self.lines)
                finally: self.busy = False
        return len(s)

    def flush(self): sys.__stdout__.flush()


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
    dup_nb, dup_text = DUPLICATE_OF_TRAIN
    dups = [(nb, i) for nb, p in plans.items() if nb.name == dup_nb for i, s in p['gpu'] if dup_text in s]
    rep.add(f"`#| gpu` cells of {', '.join(nb.name for nb in plans)}, each notebook in a fresh namespace with the definitions "
            "its gpu cells read (found by name in earlier cells, with the calls that act on them, executed in notebook order). "
            f"The cell of {dup_nb} with *{dup_text}* is left to the `train` item, which compiles and times that step (batch 6, "
            "through the Trainer): a second cold compile of the whole model (~60-90 s) does not fit the run's 9 minutes." +
            (" Dry run: the definitions run, each gpu cell is compiled and every global name and attribute chain it reads is "
             "resolved; the cells themselves need CUDA (FlexAttention has no CPU backward)" + (
             "; `--rehearse`: each also runs on CPU (device 'cpu', `tiny`, lengths 256) up to its first flex backward." if REHEARSE
             else f", so they do not run (`--rehearse` runs them on CPU up to their first flex backward, {REHEARSE_EXTRA})." ) if dry else ''))
    if len(dups) != 1:
        rep.add(f"**FAIL**: {len(dups)} gpu cells of {dup_nb} hold *{dup_text}* (expected 1): update `DUPLICATE_OF_TRAIN` "
                "in bench/gpu_check.py to the cell that `train` stands in for."); ok = False
    for nb, plan in plans.items():
        # a real module in sys.modules, as IPython's namespace is: dynamo's guards look globals up through the module
        module = types.ModuleType('gpu_cells_' + re.sub(r'\W', '_', nb.stem))
        sys.modules[module.__name__] = module
        ns = module.__dict__
        t0 = time.perf_counter()
        prereq = dict(notebook=nb.name, cell='definitions the gpu cells read', status='running')
        stage(f'gpu_cells: {nb.name}: the definitions its gpu cells read')
        rows.append(prereq); rep.rows(rows)
        try:
            for (i, j), st in plan['prereq']: exec(compile(st, f'{nb.name}:cell{i}', 'exec'), ns)
            prereq['status'] = 'ok'
        except Exception as e:
            prereq['status'] = f'FAIL: {type(e).__name__}: {str(e)[:200]}'
            traceback.print_exc(); ok = False
        prereq.update(seconds=f'{time.perf_counter() - t0:.1f}', detail=f"{len(plan['prereq'])} statements ({plan['effects']} of them calls)")
        if plan['missing']: prereq['detail'] += f"; not defined before the gpu cells: {', '.join(sorted(plan['missing']))}"
        rep.rows(rows, new=False)
        for i, src in plan['gpu']:
            first = next((l.strip() for l in src.splitlines() if l.strip() and not l.strip().startswith('#|')), '')[:110]
            row = dict(notebook=nb.name, cell=f'{i}: {first}', status='running')
            stage(f'gpu_cells: {nb.name} cell {i}')
            rows.append(row); rep.rows(rows)
            t0 = time.perf_counter()
            if (nb, i) in dups and not dry:
                row.update(status='left to `train` (the same step, batch 6, compiled and timed there)', seconds='0', detail='')
            elif dry:
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
                            bad, row['status'] = True, f'FAIL (CPU rehearsal): {first_line(e)[:240]}'
                            traceback.print_exc()
                ok &= not bad
                row.update(seconds=f'{time.perf_counter() - t0:.1f}', detail='(kept for `train` on the GPU)' if (nb, i) in dups else '')
            else:
                torch.cuda.reset_peak_memory_stats()
                def on_line(lines, row=row, t0=t0):      # what the cell prints, in its row as it comes (a cut keeps it)
                    row.update(seconds=f'{time.perf_counter() - t0:.1f}', detail=' / '.join(lines)[-400:]); rep.rows(rows, new=False)
                tee = RowTee(on_line)
                try:
                    with contextlib.redirect_stdout(tee): exec(compile(src, f'{nb.name}:cell{i}', 'exec'), ns)
                    sync(); row['status'] = 'pass'
                except Exception as e:
                    row['status'] = f'FAIL: {first_line(e)[:240]}'
                    traceback.print_exc(); ok = False
                row.update(seconds=f'{time.perf_counter() - t0:.1f}', peak_GiB=f'{torch.cuda.max_memory_allocated() / GiB:.2f}',
                           detail=' / '.join(tee.lines)[-400:])
            rep.rows(rows, new=False)
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
        stage('train: the Trainer built (model, data)')
        with inductor_in_dry_run(): run = bt.Run(c['size'], c['L'], 'museformer', c['batch'], args, tmp)   # Trainer compiles here
        trainer = run.trainer
        stage(f"train: {c['warmup'] + c['steps']} batches drawn")
        batches = [trainer._next_batch(run.phase) for _ in range(c['warmup'] + c['steps'])]   # recorded by Run, in order
        trainer._next_batch = lambda phase, queue=iter(batches): next(queue)
        S, own = fixed_summary_slots(trainer.model, batches, c['extra_slots'])
        setup_s = time.perf_counter() - t0
        stage('train: the matmul anchor')
        anchor_before = anchor()
        if not dry: torch.cuda.reset_peak_memory_stats()
        steps, compiled_at = [], WATCH.mark()
        for i in range(c['warmup']):
            stage(f"train: warm-up step {i + 1}" + (' (compiles the model and its flex shapes)' if i == 0 else ''))
            dt, loss, _ = run.step()
            steps.append(dict(step=f'warm-up {i + 1}', seconds=f'{dt:.2f}', loss=f'{loss:.3f}', compilations=len(WATCH.since(compiled_at))))
            rep.rows(steps); compiled_at = WATCH.mark(); WATCH.save()
        warm_alloc = torch.cuda.max_memory_allocated() / GiB if not dry else None
        if not dry: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        timed_at, timed = WATCH.mark(), []
        stage(f"train: {c['steps']} timed steps")
        for i in range(c['steps']):
            dt, loss, cpu_util = run.step()
            timed.append((dt, loss, cpu_util))
            steps.append(dict(step=f'timed {i + 1}', seconds=f'{dt:.3f}', loss=f'{loss:.3f}', compilations=len(WATCH.since(compiled_at)),
                              **({'tokens/s so far (all slots)': f"{c['batch'] * c['L'] * len(timed) / sum(t[0] for t in timed):,.0f}"})))
            rep.rows(steps); compiled_at = WATCH.mark()
        late = WATCH.since(timed_at)
        real = sum(int((b['ids'] != trainer.tok.pad_id).sum()) for b in batches[c['warmup']:])   # a first figure (a cut keeps it):
        tok_s = real / sum(t[0] for t in timed)                                               # replaced by the summary's median
        rep.goal('tokens_per_s', f"{tok_s:,.0f} tokens/s (real tokens, all timed steps; the summary was not reached)",
                 tok_s >= GOALS['tokens_per_s'] and not late)
        alloc = torch.cuda.max_memory_allocated() / GiB if not dry else None
        reserved = torch.cuda.max_memory_reserved() / GiB if not dry else None
        if reserved is not None:           # the memory goal first: it needs no summary
            rep.goal('peak_gib', f'{reserved:.2f} GiB reserved ({alloc:.2f} allocated)', reserved <= GOALS['peak_gib'])
        anchor_after = anchor()
        run.steps = [(dt, loss, (anchor_before + anchor_after) / 2, cpu_util) for dt, loss, cpu_util in timed]
        s = run.summary()
    rep.goal('tokens_per_s', f"{s['tok_s']:,.0f} tokens/s (real tokens)", s['tok_s'] >= GOALS['tokens_per_s'] and not late)
    if dry: rep.goal('peak_gib', 'not measured on CPU', None)
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
    backward), `aot_eager`, the same batches and padding; a compilation after the first batch fails."""
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
        if i >= 1: late += got
        rows.append(dict(batch=f"{'first' if i == 0 else 'next'} {i + 1}", seconds=f'{time.perf_counter() - t0:.2f}',
                         compilations=len(got)))
    rep.add('## Flex forward, compiled (dry run)', '', f"The GPU step's flex path as far as CPU goes: a `{c['size']}` model with "
            f"`attn_backend='flex'`, its forward compiled (`aot_eager`), on the same batches with the summary slots padded to {S}; "
            "no backward (FlexAttention has none on CPU). The first batch compiles; any compilation after it fails (a compiled "
            "model that recompiles on its second call compiles everything twice on the GPU).", '', md_table(rows))
    if late: rep.add(f"**FAIL**: {len(late)} compilation(s) after the first batch ({', '.join(late[:6])})." +
                     (f" Reasons: {'; '.join(WATCH.reasons[-4:])}." if WATCH.reasons else ''))
    return not late


# ---------------------------------------------------------------------------------------------- 3. attention
def item_attention(cfg, rep: Report, dry: bool) -> bool:
    """One layer's attention (both stages) forward + backward: flex vs dense causal sdpa at each length first (the goal
    rows), then the densified mask and the block-mask build times, each started only while the budget covers it."""
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
    stage('attention: the pieces tokenized')
    files, source = ba.midi_files()
    pieces = {p.stem: tok.annotate(tok.encode(p)) for p in files}
    longest = max(pieces, key=lambda k: len(pieces[k]['seg']))
    assert len(pieces[longest]['seg']) >= max(c['lengths']), f"no piece of {max(c['lengths'])} tokens in {source}"
    rep.add(f"Prefixes of *{longest}* ({len(pieces[longest]['seg'])} tokens, from {source}); B = 1, {H} heads x {D}, {c['dtype']}. "
            "`museformer`: both stages of a layer through `attend` with the model's flex block masks (block 128): summaries "
            "read summaries and their segment (S x (S + L)), tokens read tokens and ended summaries (L x (L + S)). "
            "`dense causal`: one sdpa `is_causal` call over L tokens (flash attention on CUDA). `densified`: the same two "
            "museformer masks as dense booleans through sdpa, measured after both goal rows, while the budget covers it. "
            "Median of repeats after a warm-up (the first call compiles)." +
            (" Dry run: flex forward only (no CPU backward); the others forward + backward." if dry else ''), '', '## Forward + backward', '')
    rows, cases = [], {}
    g = torch.Generator(device=dev).manual_seed(0)
    leaf = lambda n: torch.randn(1, H, n, D, device=dev, dtype=dtype, generator=g).requires_grad_(True)
    def layer(masks, leaves, backward):
        qs, kv_sum, q, kv_upd = (t if backward else t.detach() for t in leaves)   # CPU flex: inputs without grad
        def f():
            y = attend(qs, kv_sum, kv_sum, masks.summarize).sum() + attend(q, kv_upd, kv_upd, masks.update).sum()
            if backward: y.backward()
        return f
    slowest = 0.0
    for L, reps in zip(c['lengths'], c['repeats']):            # the goal rows: flex and dense causal at each length
        t0 = time.perf_counter()
        stage(f'attention: L = {L}: block masks')
        meta = {k: v.to(dev) for k, v in ba.to_batch(pieces[longest], L).items()}
        mf = build_masks(meta, MaskConfig(), 'flex')
        S = mf.meta.S
        leaves = (leaf(S), leaf(S + L), leaf(L), leaf(L + S))
        q, kv_upd = leaves[2], leaves[3]
        def causal():
            F.scaled_dot_product_attention(q, kv_upd[:, :, :L], kv_upd[:, :, :L], is_causal=True).sum().backward()
        stage(f'attention: L = {L}: flex, {reps} repeats after a warm-up (the first call compiles)')
        t_flex = median_s(layer(mf, leaves, not dry), reps)
        stage(f'attention: L = {L}: dense causal')
        t_causal = median_s(causal, reps)
        ratio = t_causal / t_flex
        key = ('speedup_8192', 'speedup_24576')[len(rows)]           # the first length's goal, the second's (dry: 128, 256)
        target = GOALS[key]
        row = {'L': L, 'S': S, f"museformer flex ms ({'fwd' if dry else 'fwd+bwd'})": f'{1e3 * t_flex:.2f}',
               'dense causal ms': f'{1e3 * t_causal:.2f}', 'causal / flex': f'{ratio:.2f}x',
               'goal': f">= {target:g}x: {goal(ratio >= target, dry)}", 'densified ms': 'pending', 'densified / flex': ''}
        rows.append(row); rep.rows(rows)
        rep.goal(key, f'{ratio:.2f}x (flex {1e3 * t_flex:.2f} ms, causal {1e3 * t_causal:.2f} ms)', ratio >= target)
        cases[L] = (meta, leaves, t_flex, row, reps)
        del mf
        if not dry: torch.cuda.empty_cache()
        slowest = max(slowest, time.perf_counter() - t0)
    for L, (meta, leaves, t_flex, row, reps) in cases.items():   # the densified masks: after the goal rows, paced
        if time_left() < slowest + 5:
            row['densified ms'] = "not run: the item's budget left too little time"; rep.rows(rows, new=False); continue
        ms = build_masks(meta, MaskConfig(), 'sdpa')
        t_dense = median_s(layer(ms, leaves, True), reps)
        row.update({'densified ms': f'{1e3 * t_dense:.2f}', 'densified / flex': f'{t_dense / t_flex:.2f}x'})
        rep.rows(rows, new=False)
        del ms
        if not dry: torch.cuda.empty_cache()
    cases.clear()
    # block masks of a training batch: what every step builds on the host side before the forward
    B, L0 = c['build_batch'], c['lengths'][0]
    batch = next(iter(make_loader(demo_dataset('train', max_seq_len=L0), B, seed=0)))
    _, meta_b, _ = batch_to(batch, dev)
    builds = [(f"training batch {tuple(meta_b['seg'].shape)} (demo corpus)", meta_b),
              (f"1 x {c['lengths'][-1]} ({longest})", {k: v.to(dev) for k, v in ba.to_batch(pieces[longest], c['lengths'][-1]).items()})]
    rep.add('## Block-mask build time per batch', '', 'Both stages\' `BlockMask`s (`build_masks(meta, MaskConfig(), "flex")`, '
            'compiled `create_block_mask`), median of repeats after a warm-up (a new shape compiles in the warm-up); '
            'each row started only while the budget covers it.', '')
    brows = []
    for name, m in builds:
        if time_left() < 20: brows.append({'batch': name, 'build_masks flex ms': "not run: the item's budget left too little time"})
        else: brows.append({'batch': name, 'build_masks flex ms': f"{1e3 * median_s(lambda: build_masks(m, MaskConfig(), 'flex'), 5 if not dry else 2):.1f}"})
        rep.rows(brows)
    return True


# ---------------------------------------------------------------------------------------------- 4. memory
def item_memory(cfg, rep: Report, dry: bool) -> bool:
    """meloformer.memory's estimator against measured steps, one row at a time (the release batch first), then the
    length finder's answer checked by measured steps (a length measured already is not measured again), then more
    rows; every measurement after the first is started only if the item's budget still covers the slowest so far."""
    import torch
    from meloformer.memory import compare_estimates, find_max_seq_len, estimate_memory
    from meloformer.model import ModelConfig
    from meloformer.tokenizer import HIDTokenizer
    c = cfg['memory']
    dev = 'cpu' if dry else 'cuda'
    kw = dict(precision='fp32', backend='sdpa') if dry else dict(precision='bf16', backend='flex')
    if not dry:
        # each new (batch, length) compiles flex_attention anew (static shapes); dynamo's default limit (8) would
        # quietly fall back to eager flex, which materializes the full score matrix and ruins the measurement
        try:
            import torch._dynamo.config as dc
            for name in ('recompile_limit', 'cache_size_limit', 'accumulated_recompile_limit'):
                if hasattr(dc, name): setattr(dc, name, 256)
        except Exception as e: rep.add(f"(dynamo's recompile limit left as it is: {first_line(e)})")
    f = dict(c['finder'])
    size, max_probes = f.pop('size'), f.pop('max_probes')
    rep.add(f"`compare_estimates` one row at a time ({kw['precision']}, {kw['backend']}, 2 eager training steps per row on the "
            f"demo corpus tiled to L; {'CPU: peak RSS of a fresh process' if dry else 'CUDA: max_memory_allocated'}), the release "
            f"batch first; then `find_max_seq_len` (the estimator's answer) checked by measured steps: at that length and the next "
            f"multiple, or down until one fits, at most {max_probes} (a length measured already counts without a new step); then "
            f"more rows. Each measurement after the first starts only if the item's time budget covers the slowest so far (each "
            f"new shape compiles flex anew). Goal: estimate within {GOALS['estimator_pct']:g}% of the measured peak. Memory in GiB.",
            '', '## Estimator vs measured', '')
    slowest, rows, measured = [0.0], [], {}           # measured: (size, B, L) -> peak GiB, or None (out of memory)
    def errors(): return [float(r['error_pct']) for r in rows if r.get('error_pct') not in (None, '')]
    def measure(size_, B, L, why: str) -> bool:
        "One row: a measured step and the estimate beside it; False when the budget does not cover it."
        if rows and time.time() + slowest[0] + 10 > DEADLINE: return False
        t0 = time.perf_counter()
        row = dict(size=size_, batch=B, seq_len=L, why=why)
        stage(f'memory: {size_}, batch {B} x {L} ({why})')
        try: r = compare_estimates([(size_, B, L)], device=dev, **kw).iloc[0]
        except torch.cuda.OutOfMemoryError:
            row.update(measured_GiB='out of memory'); measured[(size_, B, L)] = None
        else:
            err = float(r.error_pct)
            row.update(seq_len=int(r.seq_len), measured_GiB=f'{r.measured_mb / 1024:.3f}', estimated_GiB=f'{r.estimated_mb / 1024:.3f}',
                       error_pct=f'{err:+.1f}', goal=f"within {GOALS['estimator_pct']:g}%: {goal(abs(err) <= GOALS['estimator_pct'], dry)}")
            measured[(size_, B, L)] = r.measured_mb / 1024
        finally:
            if not dry: torch.cuda.empty_cache()
        row['seconds'] = f'{time.perf_counter() - t0:.1f}'
        slowest[0] = max(slowest[0], time.perf_counter() - t0)
        rows.append(row); rep.rows(rows)
        if errors():
            e = errors()
            rep.goal('estimator', f"release row {e[0]:+.1f}%; worst of {len(e)} row(s) {max(e, key=abs):+.1f}%",
                     all(abs(x) <= GOALS['estimator_pct'] for x in e))
        return True
    for size_, B, L in c['rows']: measure(size_, B, L, 'the release batch' if (B, L) == (6, 8192) else 'row')
    if f['budget_gb'] is None:       # dry run: the budget the estimator gives a 1024-token step of this size
        f['budget_gb'] = round(estimate_memory(ModelConfig.from_size(size, vocab_size=HIDTokenizer().vocab_size), f['batch_size'], 1024, **kw, device=dev)['total'] / 1024, 3)
    answer = find_max_seq_len(size, device=dev, measure=False, **f, **kw)['max_seq_len']
    mult, B, budget = f['multiple'], f['batch_size'], f['budget_gb']
    rep.add('## Longest sequence that fits', '', f"`find_max_seq_len('{size}', budget_gb={budget:g}, batch_size={B}, multiple={mult}, "
            f"max_len={f['max_len']})` (the estimator): **{answer}** tokens. Measured probes (their rows are in the table above):", '')
    probes, fits, L, left = [], {}, max(answer, mult), ''
    while True:
        if len(probes) >= max_probes: left = f'probe cap ({max_probes}) reached'; break
        if (size, B, L) not in measured and not measure(size, B, L, 'finder probe'):
            left = "the item's budget left no time for another probe"; break
        peak = measured[(size, B, L)]
        fits[L] = peak is not None and peak <= budget
        probes.append(dict(seq_len=L, measured_GiB='out of memory' if peak is None else f'{peak:.3f}', budget_GiB=f'{budget:g}',
                           fits='yes' if fits[L] else 'no'))
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
    extra = [(s, b, l) for s, b, l in c['extra_rows'] if (s, b, l) not in measured]
    done = [r for r in extra if measure(*r, 'more sizes and lengths')]
    if len(done) < len(extra):
        rep.add(f"Rows not measured (the item's budget did not cover them): {', '.join(f'{s} {b} x {l}' for s, b, l in extra[len(done):])}.")
    return True


# ---------------------------------------------------------------------------------------------- 5. generation
def item_generate(cfg, rep: Report, dry: bool) -> bool:
    """Cached decoding (IncrementalDecoder) at a long context, eager and with the one-token step compiled by
    `IncrementalDecoder.compile_step` (fixed shapes: the whole cache is read every step, so crossing a multiple of the
    eager bucket never recompiles; two graphs: a step that closes no segment and one that closes one). Each way
    decodes the same positions twice, each pass with a decoder of its own (as every `generate` call makes one): an
    untimed pass that compiles, then the timed pass; a compilation in the timed pass fails, and so does a count of
    graphs other than the two expected."""
    import torch
    import meloformer.generate as mg
    from meloformer.tokenizer import HIDTokenizer
    from meloformer.model import MeloFormer, ModelConfig
    bg = load_bench('generate')
    c = cfg['generate']
    dev = 'cpu' if dry else 'cuda'
    ctx, n = c['ctx'], c['steps']
    tok = HIDTokenizer()
    ids = bg.stream(tok, ctx + n + 1, demo=True)             # what the GPU machine (no shared/midi) gets
    seg = tok.annotate(ids)['seg']
    closing = int(sum(seg[i] != seg[i - 1] and seg[i - 1] >= 0 for i in range(ctx, ctx + n)))   # steps that close a segment
    expected = int(closing > 0) + int(closing < n)                   # graphs: a closing step's, a plain step's
    n_seg = bg.summary_slots(tok, ids)
    torch.manual_seed(0)
    model = MeloFormer(ModelConfig.from_size(c['size'], vocab_size=tok.vocab_size)).to(dev).eval()
    rep.add(f"`{c['size']}` (fp32, batch 1, `museformer` masks), a real token stream teacher forced: prefill {ctx} tokens (eager), "
            f"then {n} one-token steps through `IncrementalDecoder.feed` ({closing} of them {'closes' if closing == 1 else 'close'} a segment and run{'s' if closing == 1 else ''} the summary "
            f"branch), twice, each pass with a new decoder: an untimed pass, then the same positions timed. Compiled: "
            f"`IncrementalDecoder.compile_step(backend={c['backend']!r}, fullgraph=True)` (the prefill stays eager; fixed shapes: "
            f"{expected} graph(s) expected, no recompile as the context grows); any compilation in the timed pass fails the item." +
            (" Dry run: inductor's CPU code generation." if dry else ''), '', '## Tokens per second', '')
    def decode(compile_kw: dict | None) -> tuple[float, float, list, list]:
        "Tokens/s of the timed pass, seconds of the untimed one, compilations in the untimed and in the timed pass."
        seconds, compiles = [], []
        for timed in (False, True):
            dec = mg.IncrementalDecoder(model, tok, 1, max_len=ctx + n + 8, max_segments=n_seg, device=dev)
            if compile_kw is not None: dec.compile_step(**compile_kw)
            with torch.no_grad():
                stage(f"generate: {'compiled' if compile_kw else 'eager'}, {'timed' if timed else 'untimed'} pass: prefill {ctx}, then {n} steps")
                dec.feed(ids[None, :ctx]); sync()
                at, t0 = WATCH.mark(), time.perf_counter()
                for i in range(ctx, ctx + n): dec.feed(ids[None, i:i + 1])
                sync(); seconds.append(time.perf_counter() - t0); compiles.append(WATCH.since(at))
        return n / seconds[1], seconds[0], compiles[0], compiles[1]
    eager, eager_warm, _, _ = decode(None)
    rows = [{'step': 'eager', 'tokens/s': f'{eager:,.1f}', 'vs eager': '1.00x', 'untimed pass s': f'{eager_warm:.2f}',
             'compilations (untimed / timed)': '-'}]
    rep.rows(rows)
    ok, notes, slowest = True, [], 0.0
    variants = [dict(backend=c['backend'], fullgraph=True)]
    if not dry: variants.append(dict(backend=c['backend'], fullgraph=True, mode='reduce-overhead'))   # CUDA graphs: paced
    for k, kw in enumerate(variants):
        label = 'compiled (' + ', '.join(f'{a}={v!r}' for a, v in kw.items() if a != 'fullgraph') + ')'
        if k and time_left() < 1.5 * slowest + 10:
            rows.append({'step': label, 'tokens/s': "not run: the item's budget left too little time"}); rep.rows(rows); continue
        t0 = time.perf_counter()
        try:
            compiled, warm, first, late = decode(kw)
        except Exception as e:
            traceback.print_exc()
            rows.append({'step': label, 'tokens/s': 'not available', 'vs eager': '-', 'untimed pass s': '-', 'compilations (untimed / timed)': '-'})
            ok = False                                # a check that cannot compile the step has failed, not passed
            notes.append(f"{label}: compiling the one-token step failed: `{first_line(e)}`.")
            rep.rows(rows)
            if k == 0: rep.goal('generate', f'eager {eager:,.1f} tokens/s; compiled: failed ({first_line(e)[:80]})', False)
            continue
        slowest = max(slowest, time.perf_counter() - t0)
        rows.append({'step': label, 'tokens/s': f'{compiled:,.1f}', 'vs eager': f'{compiled / eager:.2f}x',
                     'untimed pass s': f'{warm:.1f}', 'compilations (untimed / timed)': f'{len(first)} / {len(late)}'})
        rep.rows(rows)
        if not first:                                 # the check itself is out of date: fail, do not report eager as compiled
            raise RuntimeError("the compiled step was never compiled: IncrementalDecoder.feed no longer calls the step of compile_step")
        good = not late and (len(first) == expected or k > 0)
        if late:
            notes.append(f"**FAIL** ({label}): {len(late)} compilation(s) inside the timed steps ({', '.join(late[:6])}); the "
                         "tokens/s above include compile time." + (f" Reasons: {'; '.join(WATCH.reasons[-4:])}." if WATCH.reasons else ''))
        elif len(first) != expected and k == 0:
            notes.append(f"**FAIL** ({label}): {len(first)} compilation(s) in the untimed pass, {expected} expected ({', '.join(first[:6])})." +
                         (f" Reasons: {'; '.join(WATCH.reasons[:4])}." if WATCH.reasons else ''))
        ok &= good
        if k == 0: rep.goal('generate', f'eager {eager:,.1f} tokens/s, compiled {compiled:,.1f} ({compiled / eager:.2f}x)', good)
    if WATCH.reasons and ok: notes.append(f"Why each graph after the first was compiled (the guard that failed, first 4): "
                                          f"{'; '.join(WATCH.reasons[:4])}.")
    if notes: rep.add(*notes)
    return ok


# ---------------------------------------------------------------------------------------------- an item's process
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
    global WATCH, DEADLINE, STATS, ITEM_T0
    t0, DEADLINE = time.perf_counter(), deadline
    ITEM_T0 = t0
    STATS = out_dir / 'logs' / f'{item}.json'
    import torch
    torch.manual_seed(0)
    if dry:
        import functools
        compile_ = torch.compile
        torch.compile = functools.wraps(compile_)(lambda *args, **kw: compile_(*args, **{'backend': DRY_BACKEND, **kw}))
        try:
            import torch._inductor.config as inductor_config
            inductor_config.cpp.vec_isa_ok = False   # scalar C++: the same lowering; no vector-ISA probe builds, a shorter compile
        except Exception as e: print(f"(inductor's vector-ISA setting left as it is: {first_line(e)})", flush=True)
    device = 'cpu' if dry else f'cuda ({torch.cuda.get_device_name()})'
    save_stats(device=device, torch=torch.__version__)
    WATCH = CompileWatch()
    rep = Report(out_dir / f'{item}.md', TITLES[item], dry, device, run_id)
    try: ok = globals()[f'item_{item}'](CONFIG['dry' if dry else 'gpu'], rep, dry)
    except Exception as e:
        traceback.print_exc()
        rep.add(f"**ERROR** after {time.perf_counter() - t0:.0f} s: `{first_line(e)}` (traceback in the log)."); ok = None
    rep.add(f"Item time {time.perf_counter() - t0:.0f} s; {WATCH.line()}." + ('' if ok or ok is None else ' **A check FAILED** (see above).'))
    WATCH.save()
    return 0 if ok else 3 if ok is None else 1


def die_with_parent():
    "In a new item process, before it runs: the kernel kills it when the runner dies, however the runner dies."
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)        # PR_SET_PDEATHSIG
    except Exception: pass


# ---------------------------------------------------------------------------------------------- the runner
def descendants(pid: int) -> list[int]:
    "Every process below `pid` (from /proc), children first: compile workers and loaders an item started."
    kids = {}
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try: ppid = int(Path(f'/proc/{d}/stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(0), []): out.append(k); todo.append(k)
    return out


def alive(pid: int) -> bool:
    "A process that still runs (a zombie, dead but not yet reaped by its parent, does not)."
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError): return False


def stop(p: subprocess.Popen, grace_s: float = 5) -> str:
    """End an item's process, its process group and every process below it (compile workers, loaders, whatever set up
    a session of its own): SIGTERM, then SIGKILL, each with a bounded wait. '' when all are gone, else what is left."""
    pids = [p.pid] + descendants(p.pid)
    groups = set()
    for pid in pids:
        try: groups.add(os.getpgid(pid))
        except ProcessLookupError: pass
    groups.discard(os.getpgrp())                      # never the runner's own group
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError): os.killpg(g, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError): os.kill(pid, sig)
        end = time.time() + wait_s
        while time.time() < end:
            with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired): p.wait(timeout=0.2)
            if p.poll() is not None and not any(alive(x) for x in pids[1:]): return ''
    left = [x for x in pids if alive(x) and (x != p.pid or p.poll() is None)]
    return f"process(es) {', '.join(map(str, left))} still there 30 s after SIGKILL (stuck in the kernel or the driver); left behind" if left else ''


CHILD: subprocess.Popen | None = None   # the item running now: ended when the runner exits or is stopped


class Stopped(Exception):
    "The runner got SIGTERM, SIGINT or SIGHUP: end the running item, write what there is, exit."


def on_signal(signum, frame):
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)   # one stop, carried through
    raise Stopped(signal.Signals(signum).name)


def end_child():
    "atexit: whatever way the runner leaves, the running item's processes go with it."
    if CHILD is not None and CHILD.poll() is None: stop(CHILD, grace_s=2)


PROBE = r"""
import json, platform, sys
d = dict(python=platform.python_version())
try:
    import torch
    d.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if d['cuda_available']:
        p = torch.cuda.get_device_properties(0)
        d.update(gpu=p.name, gpu_gib=round(p.total_memory / 2**30), capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count)
    import meloformer.model, meloformer.train, meloformer.generate, meloformer.memory, meloformer.cli
except Exception as e: d['error'] = f'{type(e).__name__}: {e}'
print(json.dumps(d))
"""


def probe(env: dict) -> dict:
    "The device and the imports, seen from a process of their own (the runner itself never starts CUDA)."
    try: r = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    except subprocess.TimeoutExpired: return dict(error='the probe process did not answer within 180 s')
    try: return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError): return dict(error=(r.stderr.strip().splitlines() or ['no output'])[-1])


def machine_line(info: dict, dry: bool) -> str:
    "The run's machine, from the probe and nvidia-smi."
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    gpu = f"{info['gpu']}, {info['gpu_gib']} GiB, {info['sms']} SMs" if info.get('gpu') else 'none'
    return (f"{cpu}, {os.cpu_count()} cores; GPU: {gpu}; driver {nvidia_driver()}, CUDA {info.get('cuda') or 'none'}; "
            f"torch {info.get('torch', '?')}, Python {info.get('python', '?')}; device measured: {'cpu (dry run)' if dry else 'cuda'}")


def read_record(md: Path) -> dict | None:
    "An item file's record (its last line), None for a file without one."
    m = re.search(re.escape(RECORD) + r'(.*) -->\s*$', md.read_text(errors='replace'))
    try: return json.loads(m.group(1)) if m else None
    except json.JSONDecodeError: return None


def finish_item(md: Path, item: str, status: str, run_id: str, started: str, seconds: float, dry: bool, stats: dict):
    """The runner's last word in an item's file: its status line replaces `running` (a file the item never wrote gets
    one), and its record, for summary.md, goes on the last line."""
    line = f"**Status: {status}** (run `{run_id}`)."
    if md.exists(): lines = [l for l in md.read_text().splitlines() if not l.startswith(RECORD)]
    else: lines = [f"# GPU check: {TITLES[item]}", '', f"Run `{run_id}`.", '', STATUS_RUNNING, '', 'The item wrote nothing (see its log).']
    at = next((i for i, l in enumerate(lines) if l.startswith(STATUS_RUNNING)), None)
    if at is None: lines += ['', line]
    else: lines[at] = line
    record = dict(item=item, run_id=run_id, date=started, dry=dry, status=status, seconds=round(seconds), **stats)
    write_atomic(md, '\n'.join(lines + ['', RECORD + json.dumps(record) + ' -->']) + '\n')


def summarize(out: Path, header: str = '', progress: str = '') -> str:
    """summary.md of a folder, built from its item files: each item's latest run there (its run id and date), the items'
    status, and the goals (target, measured, goal met) apart from it. A rerun of some items replaces only theirs."""
    run = out / 'logs' / 'run.json'                  # the latest run's machine line and progress, for a rebuild alone
    if header: write_atomic(run, json.dumps(dict(header=header, progress=progress)))
    elif run.exists(): header, progress = (json.loads(run.read_text()).get(k, '') for k in ('header', 'progress'))
    recs = {}
    for item in ITEMS:
        md = out / f'{item}.md'
        if md.exists(): recs[item] = read_record(md) or dict(item=item, status='? (no record: a file of an older format, or the run was stopped during it)')
    dry = any(r.get('dry') for r in recs.values())
    lines = [f"# GPU check{' (CPU dry run)' if dry else ''}", '']
    if header: lines += [header, '']
    if progress: lines += [progress, '']
    lines += ["Built from the item files in this folder (`python bench/gpu_check.py --summarize FOLDER` rebuilds it): each item's "
              "latest run, its run id and date. *goal met* says whether a measured figure meets its goal; an item's *status* says "
              "whether its run and its checks passed.", '', '## Goals', '']
    goal_rows = []
    for key, item, what, target in GOAL_ROWS:
        r = recs.get(item) or {}
        g = (r.get('goals') or {}).get(key)
        met = ('n/a (dry run)' if r.get('dry') else 'not measured' if g is None else '-' if g['met'] is None
               else 'yes' if g['met'] else 'NO')
        goal_rows.append({'goal': what, 'target': target, 'measured': g['measured'] if g else '-', 'goal met': met,
                          'item (run, date)': f"{item} ({r.get('run_id', '-')}, {r.get('date', '-')})" if r else f'{item} (not run)'})
    lines += [md_table(goal_rows), '', '## Items', '']
    item_rows = []
    for item in ITEMS:
        r = recs.get(item)
        if r is None: item_rows.append(dict(item=item, status='not run in this folder')); continue
        compiled = f"{r['compile_s']} ({r['compilations']})" if 'compile_s' in r else '-'
        item_rows.append({'item': item, 'status': r.get('status', '?'), 'run': r.get('run_id', '-'), 'date': r.get('date', '-'),
                          'seconds': r.get('seconds', '-'), 'compile s (compilations)': compiled,
                          'FX graph cache hit / miss': f"{r.get('fx_hit', '-')} / {r.get('fx_miss', '-')}", 'file': f'{item}.md'})
    lines.append(md_table(item_rows))
    text = '\n'.join(lines) + '\n'
    write_atomic(out / 'summary.md', text)
    return text


def export(out: Path, dest: Path | None):
    """Copy what the GPU machine must return into `dest`: the item files in `out`, summary.md and one logs.tar.gz (each
    log cut to its last 4 MiB), each replaced whole; at most len(ITEMS) + 2 files, none in a subfolder."""
    if dest is None: return
    for f in [out / f'{i}.md' for i in ITEMS] + [out / 'summary.md']:
        if f.exists(): write_atomic(dest / f.name, f.read_text())
    tmp = dest / 'logs.tar.gz.part'
    with tarfile.open(tmp, 'w:gz') as tar:
        for f in sorted((out / 'logs').glob('*')) if (out / 'logs').is_dir() else []:
            if not f.is_file() or f.suffix == '.part': continue
            data = f.read_bytes()[-4 * 2 ** 20:]
            info = tarfile.TarInfo(f'logs/{f.name}'); info.size, info.mtime = len(data), int(f.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, dest / 'logs.tar.gz')
    for stray in dest.glob('*.part'): stray.unlink(missing_ok=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dry-run', action='store_true', help="run every item on CPU with tiny sizes and short lengths (CI)")
    p.add_argument('--items', nargs='+', choices=ITEMS, default=ITEMS, help="items to run, in the given order (default: all)")
    p.add_argument('--out_dir', default=None, help="where <item>.md, summary.md and logs/ go (default: bench/results/gpu; "
                   "dry run: a new temp folder); an item file of an earlier run there stays until its item runs again")
    p.add_argument('--cache_dir', default=None, help="the compile cache shared by the items and kept for the next run "
                   "(default: <out_dir>/compile_cache); delete it for a cold run")
    p.add_argument('--export', default=None, metavar='DIR', help="also copy the item files, summary.md and logs.tar.gz into DIR as "
                   "they are written (bench/gpu_device.sh gives the folder the GPU machine returns)")
    p.add_argument('--budgets', nargs='+', default=[], metavar='ITEM=SECONDS', help="override an item's time budget, e.g. train=300 "
                   f"(defaults: GPU {', '.join(f'{k} {v}' for k, v in BUDGET_GPU.items())}; dry run "
                   f"{', '.join(f'{k} {v}' for k, v in BUDGET_DRY.items())}, gpu_cells +{REHEARSE_BUDGET} with --rehearse)")
    p.add_argument('--total_s', type=float, default=None, help=f"budget of the whole run (default: {TOTAL_GPU} s on GPU, {TOTAL_DRY} s dry)")
    p.add_argument('--rehearse', action='store_true', help="dry run: also run the gpu notebook cells on CPU (device 'cpu', tiny "
                   f"model, lengths 256) up to their first flex backward ({REHEARSE_EXTRA}; CI does)")
    p.add_argument('--summarize', default=None, metavar='DIR', help="only rebuild DIR/summary.md from the item files in DIR "
                   "(after copying a rerun's item files beside an earlier run's); with --export, copy the results there too")
    p.add_argument('--_child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--_run_id', default=None, help=argparse.SUPPRESS)
    p.add_argument('--_deadline', type=float, default=None, help=argparse.SUPPRESS)
    return p


def usable_dir(flag: str, path: str) -> Path:
    "A folder that exists (made if need be) and takes files; a one-line error naming the flag and the reason otherwise."
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe_file = d / f'.gpu_check-{os.getpid()}.part'
        probe_file.write_text(''); probe_file.unlink()
    except OSError as e:
        raise SystemExit(f"gpu_check.py: {flag} {path}: not a folder it can write to ({e.strerror or e})")
    return d.resolve()


def error(msg: str) -> int:
    print(f"gpu_check.py: {msg}", file=sys.stderr); return 2


def main(argv=None) -> int:
    global REHEARSE, EXPORT, CHILD
    a = parser().parse_args(argv)
    REHEARSE = a.rehearse
    if a._child:
        EXPORT = Path(a.export) if a.export else None
        return run_item(a._child, Path(a.out_dir), a.dry_run, a._run_id or '?', a._deadline or float('inf'))
    if a.summarize:
        d = Path(a.summarize)
        if not d.is_dir(): return error(f"--summarize {a.summarize}: no such folder")
        try: dest = usable_dir('--export', a.export) if a.export else None
        except SystemExit as e: return error(str(e).removeprefix('gpu_check.py: '))
        print(summarize(d)); export(d, dest); return 0
    if a.rehearse and not a.dry_run: return error("--rehearse goes with --dry-run (on a GPU the cells run for real)")
    budgets = dict(BUDGET_DRY if a.dry_run else BUDGET_GPU)
    if a.rehearse: budgets['gpu_cells'] += REHEARSE_BUDGET
    for spec in a.budgets:
        name, _, sec = spec.partition('=')
        if name not in ITEMS or not re.fullmatch(r'\d+(\.\d+)?', sec) or float(sec) <= 0:
            return error(f"--budgets {spec!r}: expected ITEM=SECONDS, SECONDS > 0, ITEM one of {', '.join(ITEMS)}")
        budgets[name] = float(sec)
    if a.total_s is not None and not a.total_s > 0: return error(f"--total_s {a.total_s:g}: the whole run's budget must be > 0 seconds")
    try:
        out = usable_dir('--out_dir', a.out_dir) if a.out_dir else Path(tempfile.mkdtemp(prefix='meloformer-gpu-dry-')) if a.dry_run \
            else usable_dir('--out_dir', str(RESULTS))
        (out / 'logs').mkdir(exist_ok=True)
        cache = usable_dir('--cache_dir', a.cache_dir or str(out / 'compile_cache'))
        EXPORT = usable_dir('--export', a.export) if a.export else None
    except SystemExit as e: return error(str(e).removeprefix('gpu_check.py: '))
    if EXPORT and (EXPORT == out or out in EXPORT.parents or EXPORT in cache.parents or cache == EXPORT):
        return error(f"--export {a.export}: must be a folder of its own (not --out_dir, nor holding the compile cache)")
    # the children: the repository first on their path (`python bench/gpu_check.py` puts bench/ there, not the root);
    # one compile cache for every item (and the next run): what an item compiled, a later one loads
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
           'PYTHONUNBUFFERED': '1', 'TORCHINDUCTOR_CACHE_DIR': str(cache / 'inductor'), 'TRITON_CACHE_DIR': str(cache / 'triton'),
           'TORCHINDUCTOR_FX_GRAPH_CACHE': '1', 'TORCHINDUCTOR_AUTOGRAD_CACHE': '1',
           # dry run: one thread per process; two OpenMP threads on two cores that other work shares made a tiny step ~4-70x slower
           **({'OMP_NUM_THREADS': '1'} if a.dry_run else {})}
    run_id = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    total = a.total_s or (TOTAL_DRY if a.dry_run else TOTAL_GPU)
    start = time.perf_counter()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP): signal.signal(s, on_signal)
    atexit.register(end_child)
    try:
        info = probe(env)
        if info.get('error'):
            return error(f"the items cannot start here: {info['error']} (on the GPU machine, carry the wheels: bash bench/fetch_wheels.sh; "
                         "DEVELOPERS.md, GPU)")
        if not a.dry_run and not info.get('cuda_available'):
            return error("no CUDA device here (torch sees none); `--dry-run` runs the same items on CPU")
        header = machine_line(info, a.dry_run)
        print(f"GPU check{' (CPU dry run)' if a.dry_run else ''} run {run_id}: items {', '.join(a.items)}; results in {out}; compile cache "
              f"{cache}{f'; exported to {EXPORT}' if EXPORT else ''}; budgets {', '.join(f'{i} {budgets[i]:.0f} s' for i in a.items)}, "
              f"whole run {total:.0f} s (time an item leaves is carried to the next)\n{header}", flush=True)
        results, planned = {}, 0.0
        def progress(pending):
            return (f"This run (`{run_id}`, {datetime.datetime.now():%Y-%m-%d %H:%M}): {time.perf_counter() - start:.0f} s of its "
                    f"{total:.0f} s" + (f"; not yet run: {', '.join(pending)}" if pending else '; finished') + '.')
        summarize(out, header, progress(a.items)); export(out, EXPORT)
        for k, item in enumerate(a.items):
            elapsed = time.perf_counter() - start
            carried = max(0.0, planned - elapsed)                 # what earlier items left of their budgets
            planned += budgets[item]
            budget = min(budgets[item] + carried, total - elapsed)
            md, log = out / f'{item}.md', out / 'logs' / f'{item}.log'
            for stale in (md, md.with_name(md.name + '.part'), out / 'logs' / f'{item}.json'): stale.unlink(missing_ok=True)
            started = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
            if budget < 15:
                status = 'SKIPPED (no time left in the whole run)'
                finish_item(md, item, status, run_id, started, 0, a.dry_run, {}); results[item] = status
                summarize(out, header, progress(a.items[k + 1:])); export(out, EXPORT); continue
            print(f"== {item} (budget {budget:.0f} s{f', {carried:.0f} s of it carried over' if carried >= 1 else ''}; log {log})", flush=True)
            t0, problem, rc, stopped = time.perf_counter(), '', None, None
            with open(log, 'w') as lf:
                cmd = ([sys.executable, __file__, '--_child', item, '--out_dir', str(out), '--_run_id', run_id, '--_deadline', str(time.time() + budget)]
                       + (['--dry-run'] if a.dry_run else []) + (['--rehearse'] if a.rehearse else []) + (['--export', str(EXPORT)] if EXPORT else []))
                CHILD = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
                                         preexec_fn=die_with_parent)
                try: rc = CHILD.wait(timeout=budget)
                except subprocess.TimeoutExpired: problem = stop(CHILD)
                except Stopped as e: stopped, problem = e.args[0], stop(CHILD, grace_s=2)
                CHILD = None
            dt = time.perf_counter() - t0
            status = (f'STOPPED after {dt:.0f} s (the run got {stopped})' if stopped else f'CUT after {dt:.0f} s (budget {budget:.0f} s)'
                      if rc is None else 'pass' if rc == 0 else 'FAIL' if rc == 1 else 'ERROR (the item raised)' if rc == 3 else f'ERROR (exit {rc})')
            if problem: status += f'; {problem}'
            detail = {'CUT': 'over its budget; the figures in this file are those finished before the cut',
                      'STOPPED': 'the figures in this file are those finished before the stop',
                      'FAIL': 'a check failed (see above)', 'ERROR (the item': f'see the error above and logs/{item}.log',
                      'ERROR (exit': f'the process ended abnormally (see logs/{item}.log)'}
            stats_file = out / 'logs' / f'{item}.json'
            stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
            finish_item(md, item, status + next((f': {v}' for k_, v in detail.items() if status.startswith(k_)), ''), run_id, started,
                        dt, a.dry_run, {k_: v for k_, v in stats.items() if k_ in ('goals', 'compile_s', 'compilations', 'fx_hit', 'fx_miss', 'device')})
            results[item] = status
            if rc != 0:
                tail = log.read_text(errors='replace').splitlines()[-25:]
                print(f"-- {item}: {status}; last lines of {log}:", *('   ' + l for l in tail), sep='\n', flush=True)
            print(f"-- {item}: {status} in {dt:.0f} s -> {md}", flush=True)
            if stopped:
                for later in a.items[k + 1:]: results[later] = 'not run (the run was stopped)'
                summarize(out, header, progress(a.items[k + 1:]) + f' Stopped by {stopped}.'); export(out, EXPORT)
                print(f"gpu_check.py: stopped by {stopped}; files in {out}", file=sys.stderr, flush=True)
                return 128 + getattr(signal, stopped)
            summarize(out, header, progress(a.items[k + 1:])); export(out, EXPORT)
    except Stopped as e:                              # between items, or while probing: nothing running to end
        summarize(out, header if 'header' in locals() else '', f'This run (`{run_id}`) was stopped by {e.args[0]}.'); export(out, EXPORT)
        return 128 + getattr(signal, e.args[0])
    print('\n' + md_table([dict(item=i, status=s) for i, s in results.items()]) +
          f"\n\nwhole run {time.perf_counter() - start:.0f} s; files in {out}" + (f'; exported to {EXPORT}' if EXPORT else ''), flush=True)
    return 0 if all(s == 'pass' for s in results.values()) else 1


if __name__ == '__main__': sys.exit(main())
