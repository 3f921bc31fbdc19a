"""Training throughput and model FLOPs utilization (MFU) of MeloFormer, against a matmul peak measured in the same run.

Runs the real training step (`meloformer.train.Trainer.train_step`: loader, masks, forward, loss, backward,
grad clip, AdamW) on rows of the embedded demo corpus for each model size, sequence length and mask preset
(`museformer`, the default, and `dense`, plain causal attention, beside it). After warm-up steps it times
several steps and reports the medians: real (non-pad) tokens/s, padded token slots/s, and MFU two ways:

- dense-equivalent: 6N + 12 * n_layer * d_model * L FLOPs per real token (nanoGPT's estimate for a dense
  model at context L, with N the parameter count, tied embedding counted once);
- attended pairs: 6N per real token + 6 * N_blocks per real summary slot (summaries also run through each
  layer's projections and FFN) + 12 * n_layer * d_model per attended query-key pair, counted as the True
  entries of the model's dense masks of that batch (update mask: real queries over regular + summary keys;
  summarize mask: real summaries over summary + regular keys).

The anchor is the GFLOP/s of a square matmul (fp32 `torch.mm` 2048 x 2048 on CPU, bf16 8192 x 8192 on CUDA) with
the same threads, measured between consecutive timed steps; MFU = a step's achieved FLOP/s / the mean of the
anchors just before and after it (the machine may be shared: load slows the step and its anchors together).
The presets of one size and L run interleaved, step by step, so their ratio sees the same conditions.
Prints markdown tables and writes them to bench/results/train.md (or `--out`).

    python bench/train.py                       # CPU: tiny and small at L = 1024, 2048 (~3-4 minutes, 2 cores)
    python bench/train.py --device cuda         # GPU: bf16 autocast, flex attention; add --compile
    python bench/train.py --quick               # a smoke run
"""
import argparse, statistics, sys, tempfile, time
from pathlib import Path

import torch

from meloformer.train import Trainer, TrainConfig
from meloformer.model import batch_to
from _common import machine_info

OUT = Path(__file__).resolve().parent / 'results'




def md_table(rows: list[dict], right=()) -> str:
    cols = list(rows[0])
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '|'.join('---:' if c in right else '---' for c in cols) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(r[c]) for c in cols) + ' |' for r in rows])


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


_operands = {}

def matmul_peak(device, n: int, dtype, repeats: int = 10, warmup: int = 3) -> dict:
    "Median (and best) GFLOP/s of an n x n @ n x n matmul: the roofline the training step is compared with."
    key = (str(device), n, dtype)
    if key not in _operands: _operands[key] = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    a, b = _operands[key]
    for _ in range(warmup): torch.mm(a, b)
    sync(device)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter(); torch.mm(a, b); sync(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return dict(median=statistics.median(rates), best=max(rates), rates=rates)


def count_pairs(model, ids, meta, pad_id) -> dict:
    "Attended query-key pairs of a batch from the model's dense (sdpa) masks, real queries only; one row at a time."
    pairs = summaries = 0
    for r in range(ids.shape[0]):
        masks = model.build_masks({k: v[r:r + 1] for k, v in meta.items()}, backend='sdpa')
        real_q = ids[r] != pad_id                                        # (L,)
        pairs += int(masks.update[0, 0][real_q].sum())
        if masks.summarize is not None:
            real_s = masks.meta.s_end[0] < masks.meta.L                  # unused summary slots end at L
            pairs += int(masks.summarize[0, 0][real_s].sum())
            summaries += int(real_s.sum())
    return dict(pairs=pairs, summaries=summaries)


class Run:
    "One Trainer (size, L, preset) and the record of its steps; steps of several runs are interleaved."
    def __init__(self, size: str, L: int, preset: str, batch_size: int, args, tmp: str):
        cuda = args.device == 'cuda'
        cfg = TrainConfig(model_size=size, max_seq_len=L, batch_size=batch_size, gradient_accumulation_steps=1,
                          num_workers=args.num_workers, phases='none', mask_preset=preset, device=args.device,
                          attn_backend='flex' if cuda else 'sdpa', precision='bf16' if cuda else 'fp32',
                          compile=args.compile, max_steps=10_000, warmup_steps=10, lr=3e-4, progress=False,
                          out_dir=str(Path(tmp) / preset), seed=0)
        self.size, self.L, self.preset, self.batch = size, L, preset, batch_size
        self.trainer = t = Trainer(cfg)
        self.phase = t.schedule.phases[0]
        t._it = iter(t._loader(self.phase))
        self.seen, next_batch = [], t._next_batch                     # the batches the steps consumed, counted afterwards
        def recording_next_batch(ph):
            # the sampler groups rows by padded length; take only full-length batches (rows padded to L)
            for _ in range(10_000):
                batch = next_batch(ph)
                if batch['ids'].shape[1] == L: break
            self.seen.append(batch); return batch
        t._next_batch = recording_next_batch
        self.steps = []                                                # (seconds, loss, local anchor GFLOP/s) of timed steps

    def step(self) -> tuple[float, float, float]:
        "Seconds, loss, and the share of this machine's threads the step got (process CPU time / (wall * threads))."
        device = self.trainer.device
        sync(device); t, cpu = time.perf_counter(), time.process_time()
        out = self.trainer.train_step(self.phase)
        sync(device)
        dt = time.perf_counter() - t
        return dt, out['loss'], (time.process_time() - cpu) / (dt * torch.get_num_threads())

    def summary(self) -> dict:
        "Medians over the timed steps; FLOPs from each step's own batch and masks, MFU against the step's own anchor."
        model, device, pad_id, c = self.trainer.model, self.trainer.device, self.trainer.tok.pad_id, self.trainer.model.cfg
        # N of a regular token: every parameter but the summaries' own (tied embedding counted once, as the head)
        summary_only = sum(b.attn.sum_kv.weight.numel() for b in model.blocks if b.attn.sum_kv is not None)
        summary_only += model.summary_emb.numel() if model.summary_emb is not None else 0
        n_params, n_block_params = model.n_params() - summary_only, sum(p.numel() for p in model.blocks.parameters())
        timed = self.seen[-len(self.steps):]
        per_step, mask_ms = [], []
        for batch, (dt, loss, anchor, cpu_util) in zip(timed, self.steps):
            ids, meta, _ = batch_to(batch, device)
            sync(device); t = time.perf_counter(); model.build_masks(meta); sync(device)   # host work inside every step, alone
            mask_ms.append((time.perf_counter() - t) * 1e3)
            real, slots, Lpad = int((ids != pad_id).sum()), ids.numel(), ids.shape[1]
            cnt = count_pairs(model, ids, meta, pad_id)
            dense_flops = real * (6 * n_params + 12 * c.n_layer * c.d_model * Lpad)
            pair_flops = 6 * n_params * real + 6 * n_block_params * cnt['summaries'] + 12 * c.n_layer * c.d_model * cnt['pairs']
            per_step.append(dict(dt=dt, real=real, slots=slots, Lpad=Lpad, tok_s=real / dt, slot_s=slots / dt, anchor=anchor,
                                 gflops_dense=dense_flops / dt / 1e9, gflops_pairs=pair_flops / dt / 1e9,
                                 tok_per_anchor=real / dt / anchor, mfu_dense=dense_flops / dt / 1e9 / anchor,
                                 mfu_pairs=pair_flops / dt / 1e9 / anchor, pairs_per_tok=cnt['pairs'] / real,
                                 summaries=cnt['summaries'], loss=loss, cpu_util=cpu_util))
        med = lambda k: statistics.median(s[k] for s in per_step)
        return dict(size=self.size, L=self.L, preset=self.preset, batch=self.batch, params=model.n_params(), steps=len(per_step),
                    step_s=med('dt'), tok_s=med('tok_s'), slot_s=med('slot_s'), anchor=med('anchor'), tok_per_anchor=med('tok_per_anchor'),
                    pad_frac=1 - sum(s['real'] for s in per_step) / sum(s['slots'] for s in per_step),
                    Lpad=sorted({s['Lpad'] for s in per_step}), pairs_per_tok=med('pairs_per_tok'), summaries=med('summaries'),
                    mfu_dense=med('mfu_dense'), mfu_pairs=med('mfu_pairs'), gflops_dense=med('gflops_dense'), gflops_pairs=med('gflops_pairs'), mask_ms=statistics.median(mask_ms), cpu_util=med('cpu_util'),
                    anchor_range=(min(s['anchor'] for s in per_step), max(s['anchor'] for s in per_step)),
                    tok_s_range=(min(s['tok_s'] for s in per_step), max(s['tok_s'] for s in per_step)),
                    loss_first=per_step[0]['loss'], loss_last=per_step[-1]['loss'])


def bench_pair(size: str, L: int, presets: list[str], batch_size: int, steps: int, warmup: int, args, peak) -> list[dict]:
    """Time the presets' steps interleaved (A B A B ...), with the matmul anchor measured between consecutive steps:
    each step is compared with the mean of the anchors just before and just after it, so load from other
    processes on a shared machine moves a step's time and its anchor together."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Run(size, L, p, batch_size, args, tmp) for p in presets]
        for _ in range(warmup):
            for run in runs: run.step()
        anchor = peak()
        for _ in range(steps):
            for run in runs:
                dt, loss, cpu_util = run.step()
                after = peak()
                run.steps.append((dt, loss, (anchor + after) / 2, cpu_util)); anchor = after
        return [run.summary() for run in runs]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--sizes', nargs='+', default=['tiny', 'small'])
    p.add_argument('--lengths', type=int, nargs='+', default=None, help="max_seq_len values (default: 1024 2048 on CPU, 1024 2048 8192 on CUDA)")
    p.add_argument('--presets', nargs='+', default=['museformer', 'dense'], help="the first is the model; the others are timed beside it")
    p.add_argument('--tokens_per_step', type=int, default=None, help="rows per step = this // L (default: 2048 on CPU, 49152 on CUDA)")
    p.add_argument('--warmup', type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on CUDA)")
    p.add_argument('--steps', type=int, default=None, help="timed steps, median reported (default: 7 on CPU, 20 on CUDA)")
    p.add_argument('--anchor_repeats', type=int, default=3, help="matmuls per anchor measurement between steps (median)")
    p.add_argument('--max_step_flops', type=float, default=1e11,
                   help="CPU time guard: fewer timed steps (not below --min_steps) where one step's FLOPs exceed this")
    p.add_argument('--min_steps', type=int, default=4, help="timed steps at least, whatever the guard says")
    p.add_argument('--num_workers', type=int, default=None, help="loader workers (default: 0 on CPU, 4 on CUDA)")
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model (CUDA)")
    p.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument('--quick', action='store_true', help="tiny at L = 1024 only, 2 timed steps (a smoke run)")
    p.add_argument('--out', default=None, help="markdown output (default: bench/results/train.md, train_cuda.md on CUDA)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    cuda = args.device == 'cuda'
    if cuda and not torch.cuda.is_available(): sys.exit("--device cuda: no CUDA device here")
    if args.threads: torch.set_num_threads(args.threads)
    lengths = args.lengths or ([1024, 2048, 8192] if cuda else [1024, 2048])
    tokens_per_step = args.tokens_per_step or (49152 if cuda else 2048)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    steps = args.steps or (20 if cuda else 7)
    sizes = args.sizes
    if args.quick: sizes, lengths, steps, warmup = ['tiny'], [1024], 2, 1
    if args.num_workers is None: args.num_workers = 4 if cuda else 0
    device = torch.device(args.device)
    if cuda: torch.backends.cuda.matmul.allow_tf32 = True
    peak_n, peak_dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    info = machine_info(args.device)
    print(f"machine: {info}", flush=True)

    peak = lambda: matmul_peak(device, peak_n, peak_dtype, repeats=args.anchor_repeats, warmup=1)['median']
    t0 = time.perf_counter()
    peak_start = matmul_peak(device, peak_n, peak_dtype)
    print(f"matmul anchor at start: {peak_start['median']:.1f} GFLOP/s (best {peak_start['best']:.1f})", flush=True)
    results = []
    from meloformer.model import ModelConfig
    for size in sizes:
        c = ModelConfig.from_size(size)
        for L in lengths:
            B = max(1, tokens_per_step // L)
            est = B * L * (6 * 12 * c.n_layer * c.d_model ** 2 + 12 * c.n_layer * c.d_model * L)   # one step's FLOPs, roughly
            n_steps = steps if cuda or est <= args.max_step_flops else max(args.min_steps, min(steps, int(steps * args.max_step_flops / est)))
            for r in bench_pair(size, L, args.presets, B, n_steps, warmup, args, peak):
                results.append(r)
                print(f"{size:5s} L={L:5d} {r['preset']:10s} B={B} steps={n_steps}: {r['step_s']:.3f} s/step, {r['tok_s']:,.0f} tok/s, "
                      f"anchor {r['anchor']:.0f} GFLOP/s, MFU dense-eq {r['mfu_dense']:.1%}, attended pairs {r['mfu_pairs']:.1%}, "
                      f"masks {r['mask_ms']:.1f} ms, loss {r['loss_first']:.3f}->{r['loss_last']:.3f}", flush=True)
    peak_end = matmul_peak(device, peak_n, peak_dtype)
    print(f"matmul anchor at end: {peak_end['median']:.1f} GFLOP/s (best {peak_end['best']:.1f})", flush=True)
    elapsed = time.perf_counter() - t0

    main_preset = args.presets[0]
    by_key = {(r['size'], r['L'], r['preset']): r for r in results}
    rows = []
    for r in results:
        base = by_key.get((r['size'], r['L'], main_preset))
        rows.append({'size': r['size'], 'params': f"{r['params'] / 1e6:.2f}M", 'L': r['L'], 'preset': r['preset'], 'batch': r['batch'],
                     'padded L': '/'.join(map(str, r['Lpad'])), 'timed steps': r['steps'], 's/step': f"{r['step_s']:.3f}", 'tokens/s (real)': f"{r['tok_s']:,.0f}",
                     'slots/s (padded)': f"{r['slot_s']:,.0f}", 'pad %': f"{100 * r['pad_frac']:.1f}",
                     'anchor GFLOP/s': f"{r['anchor']:.0f}",
                     'MFU dense-eq': f"{100 * r['mfu_dense']:.1f}%", 'MFU attended pairs': f"{100 * r['mfu_pairs']:.1f}%",
                     'pairs/token': f"{r['pairs_per_tok']:.0f}", 'masks ms': f"{r['mask_ms']:.1f}",
                     f'tokens/s vs {main_preset}': f"{r['tok_per_anchor'] / base['tok_per_anchor']:.2f}x" if base else '-'})
    table = md_table(rows, right=('params', 'L', 'batch', 'padded L', 'timed steps', 's/step', 'tokens/s (real)', 'slots/s (padded)', 'pad %',
                                  'anchor GFLOP/s', 'MFU dense-eq', 'MFU attended pairs', 'pairs/token', 'masks ms', f'tokens/s vs {main_preset}'))
    spread = md_table([{'size': r['size'], 'L': r['L'], 'preset': r['preset'],
                        'tokens/s min .. max': f"{r['tok_s_range'][0]:,.0f} .. {r['tok_s_range'][1]:,.0f}",
                        'anchor GFLOP/s min .. max': f"{r['anchor_range'][0]:.0f} .. {r['anchor_range'][1]:.0f}",
                        'CPU share': f"{100 * r['cpu_util']:.0f}%", 'summaries/step': f"{r['summaries']:.0f}",
                        'loss first -> last timed': f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"} for r in results])
    print('\n' + table + '\n')

    what = ('bf16 autocast, flex attention' + (', torch.compile' if args.compile else ', eager') if cuda
            else 'fp32, sdpa attention (dense boolean masks: FlexAttention has no CPU backward), eager')
    gpu_note = ('' if cuda else
                "\n**GPU: not run.** This machine has no GPU; `python bench/train.py --device cuda [--compile]` reports the same "
                "table on one (bf16 autocast, flex attention, anchor = bf16 8192 x 8192 matmul, L up to 8192, written to "
                "`bench/results/train_cuda.md`). Issue 6's GPU goal (>= 300k tokens/s for `small` at L = 8192 on one H100) "
                "is therefore unchecked.\n")
    md = f"""# Training throughput and MFU

{info['date']}; CPU: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['threads']} threads, GPU: {info['gpu']}; Python {info['python']}. Device measured: **{args.device}**.

Real training steps (`Trainer.train_step`: loader with {args.num_workers} workers, masks, forward, loss, backward, clip, AdamW; {what}) on packed rows of the embedded demo corpus (349 chorales, 4 tracks), batches padded to L (the sampler groups rows by padded length; shorter groups are skipped); {warmup} warm-up step(s), then the median of the timed steps. Rows per step = {tokens_per_step} // L; timed steps cut (to {args.min_steps} at least) on CPU where a step exceeds ~{args.max_step_flops:.0e} FLOPs. Whole run {elapsed:.0f} s.

**Anchor**: {'bf16' if cuda else 'fp32'} `torch.mm` {peak_n} x {peak_n} GFLOP/s with the same {info['threads']} threads, measured between
consecutive timed steps (median of {args.anchor_repeats}); each step is compared with the mean of the anchors just before and after it,
so a burst of load from other processes slows the step and its anchor together. Presets of the same size and L run
interleaved (A B A B ...). Anchor at the start of the run {peak_start['median']:.1f} GFLOP/s (best {peak_start['best']:.1f}),
at the end {peak_end['median']:.1f} (best {peak_end['best']:.1f}); `anchor GFLOP/s` below is the median beside a row's steps.

- `tokens/s (real)`: non-pad tokens per second; `slots/s (padded)`: token slots incl. padding.
- `MFU dense-eq`: (6N + 12 * n_layer * d_model * L) FLOPs per real token (nanoGPT's dense estimate, full L x L) / anchor.
  N: the parameters a regular token passes through (tied embedding once; the summaries' second K/V projection is
  left out, so both presets count the same FLOPs per token and this column's ratio is the tokens/s ratio).
  `params` in the table is the full count.
- `MFU attended pairs`: 6N per real token + 6 * N_blocks per real summary slot + 12 * n_layer * d_model per attended
  query-key pair (True entries of the update and summarize masks of the timed batches, real queries only) / anchor.
  On CPU the sdpa kernel evaluates every pair of the L x (L + S) grid, masked or not, so this counts useful work, not executed work.
- `pairs/token`: attended pairs per real token (both stages); a dense causal row averages (L + 1) / 2.
- `masks ms`: building the step's masks alone (part of every step).
- `CPU share` (detail table): process CPU time / (wall time x threads) of the timed steps: below ~100% the step
  waited for cores other processes held (or for memory / single-threaded work).
- `tokens/s vs {main_preset}`: this row's tokens/s over the `{main_preset}` row's (same size and L), each divided by its steps' anchors first.

**Noisy figures**: the machine's {info['cores']} cores are shared with other work, so absolute numbers move between
runs and within one (see the anchor range per row below); read the ratios (MFU, preset ratio) rather than raw tokens/s.
{gpu_note}
{table}

Per-step detail:

{spread}
"""
    out = Path(args.out) if args.out else OUT / ('train_cuda.md' if cuda else 'train.md')
    if args.quick and not args.out: out = out.with_name(out.stem + '_quick.md')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(f"wrote {out} ({elapsed:.0f} s)")


if __name__ == '__main__': main()
