"""Cached decoding: tokens/s against recomputing the full sequence each step, and the one-token step eager vs compiled.

Both tables decode the same real token stream (teacher forced, so no sampling noise). First table: the cached
decoder prefills the context and then appends one token per step; the anchor runs the whole model on the context
plus the new token for every step. Second table: the same cached steps, eager and with the one-token pass compiled
(`IncrementalDecoder.compile_step`, fixed shapes); the graphs compiled and any recompiles during the timed steps
are counted. Medians of repeats after a warm-up, measured in the same run.
Usage: python bench/generate.py [--size tiny] [--threads 1] [--steps 16] [--repeats 3] [--compile_sizes tiny small]
"""
import argparse, datetime, os, statistics, time
from pathlib import Path
import numpy as np
import torch
from meloformer.tokenizer import HIDTokenizer, sample_midi_dir
from meloformer.data import demo_midi_dir
from meloformer.model import MeloFormer, ModelConfig
from meloformer.attention import MaskConfig, segment_slots
from meloformer.generate import IncrementalDecoder
from _common import machine_info

def stream(tok, n: int, demo: bool = False) -> np.ndarray:
    """A real token stream of at least n tokens: a shared multitrack piece, else (or with `demo`) demo pieces back to back,
    which restart their bars at each piece (size a decoder's summary slots with `summary_slots`, not `seg.max()`)."""
    shared = None if demo else sample_midi_dir()
    files = sorted((shared / 'multitrack').glob('*.mid')) if shared else []
    for f in files:
        ids = tok.encode(f)
        if len(ids) >= n: return ids[:n]
    ids = np.concatenate([tok.encode(f)[:-1] for f in sorted(demo_midi_dir().glob('*.mid'))])
    return ids[:n]

def summary_slots(tok, ids) -> int:
    "Summary slots a decoder needs for ids: the model's segment count (`segment_slots`: one per run of a segment), plus one."
    return int(segment_slots(torch.as_tensor(tok.annotate(ids)['seg'])[None]).max()) + 2

def sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()

def decode_steps(model, tok, ids, ctx, steps, device, compile_kw=None, max_len=None):
    "A fresh decoder: prefill ctx tokens (eager), then `steps` one-token feeds. (seconds per step, logits of the steps)"
    n_seg = summary_slots(tok, ids)
    dec = IncrementalDecoder(model, tok, 1, max_len=max_len or ctx + steps + 8, max_segments=n_seg, device=device)
    if compile_kw is not None: dec.compile_step(**compile_kw)
    dec.feed(ids[None, :ctx]); sync(device)
    out = []
    t0 = time.perf_counter()
    for i in range(ctx, ctx + steps): out.append(dec.feed(ids[None, i:i + 1]).float().cpu())
    sync(device)
    return (time.perf_counter() - t0) / steps, torch.cat(out, 1)

@torch.no_grad()
def cached_tps(model, tok, ids, ctx, steps, repeats, device='cpu'):
    times = [decode_steps(model, tok, ids, ctx, steps, device)[0] for _ in range(repeats + 1)][1:]   # the first is the warm-up
    return 1 / statistics.median(times)

@torch.no_grad()
def full_tps(model, tok, ids, ctx, steps, repeats):
    meta = {k: torch.tensor(v)[None] for k, v in tok.annotate(ids).items()}
    x = torch.as_tensor(ids)[None]
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for i in range(ctx, ctx + steps):                # every step: the whole prefix again
            model(x[:, :i + 1], {k: v[:, :i + 1] for k, v in meta.items()})
        if r: times.append((time.perf_counter() - t0) / steps)
    return 1 / statistics.median(times)

@torch.no_grad()
def eager_vs_compiled(model, tok, ids, ctx, steps, repeats, device, mode):
    "Eager and compiled tokens/s, interleaved repeats; graphs compiled, new graphs in the timed repeats, compile s, max rel diff."
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    before = counters['stats']['unique_graphs']
    kw = dict(mode=mode) if mode else {}
    seg = tok.annotate(ids)['seg']
    closes = np.nonzero((seg[ctx - 1:-1] >= 0) & (seg[ctx:] != seg[ctx - 1:-1]))[0]  # steps that close a segment
    warm_steps = max(steps, int(closes[0]) + 1)                                      # the warm-up compiles both graphs
    t0 = time.perf_counter()
    n = ctx + warm_steps + 8                                                         # one cache size: fixed shapes
    _, ref = decode_steps(model, tok, ids, ctx, warm_steps, device, None, n)         # warm-up, eager
    _, got = decode_steps(model, tok, ids, ctx, warm_steps, device, kw, n)           # warm-up, compiled
    warm = time.perf_counter() - t0
    graphs = counters['stats']['unique_graphs'] - before
    eager, compiled = [], []
    for _ in range(repeats):
        eager.append(decode_steps(model, tok, ids, ctx, steps, device, None, n)[0])
        compiled.append(decode_steps(model, tok, ids, ctx, steps, device, kw, n)[0])
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    return (1 / statistics.median(eager), 1 / statistics.median(compiled), int((closes < steps).sum()), graphs,
            counters['stats']['unique_graphs'] - before - graphs, warm, rel)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', default='tiny', help="model of the cached vs full recompute table")
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--steps', type=int, default=16, help="decoded tokens per repeat (cached)")
    p.add_argument('--full_steps', type=int, default=2, help="decoded tokens per repeat (full recompute)")
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--contexts', type=int, nargs='+', default=[1024, 4096])
    p.add_argument('--presets', nargs='+', default=['museformer', 'dense'])
    p.add_argument('--compile_sizes', nargs='*', default=['tiny', 'small'], help="models of the eager vs compiled table (none: skip it)")
    p.add_argument('--compile_contexts', type=int, nargs='+', default=[1024, 2048])
    p.add_argument('--compile_steps', type=int, default=48, help="one-token steps per repeat (eager vs compiled)")
    p.add_argument('--device', default='cpu', help="cpu | cuda (eager vs compiled table only)")
    p.add_argument('--mode', default=None, help="torch.compile mode of the step (default: reduce-overhead on CUDA, none on CPU)")
    p.add_argument('--out', default=None, help="results file (default: bench/results/generate.md, or generate_<device>.md off CPU)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    mode = a.mode or ('reduce-overhead' if a.device == 'cuda' else None)   # CUDA graphs replay the step on CUDA
    tok = HIDTokenizer()
    ids = stream(tok, max(a.contexts + a.compile_contexts) + max(a.steps, a.compile_steps) + 512)
    rows = []
    for preset in a.presets:
        torch.manual_seed(0)
        model = MeloFormer(ModelConfig.from_size(a.size, mask=MaskConfig.from_preset(preset), attn_backend='sdpa')).eval()
        for ctx in a.contexts:
            c = cached_tps(model, tok, ids, ctx, a.steps, a.repeats)
            f = full_tps(model, tok, ids, ctx, a.full_steps, a.repeats)
            rows.append((preset, ctx, c, f))
            print(f"{preset} ctx {ctx}: cached {c:.1f} tok/s, full recompute {f:.2f} tok/s, {c / f:.0f}x", flush=True)
    crows = []
    for size in a.compile_sizes:
        torch.manual_seed(0)
        model = MeloFormer(ModelConfig.from_size(size, attn_backend='sdpa')).to(a.device).eval()
        for ctx in a.compile_contexts:
            e, c, closing, graphs, new, warm, rel = eager_vs_compiled(model, tok, ids, ctx, a.compile_steps, a.repeats, a.device, mode)
            crows.append((size, ctx, e, c, closing, graphs, new, warm, rel))
            print(f"{size} ctx {ctx}: eager {e:.1f} tok/s, compiled {c:.1f} tok/s ({c / e:.2f}x); {closing} closing steps, {graphs} graphs, "
                  f"{new} new in the timed steps; warm-up {warm:.0f} s; max rel diff {rel:.1e}", flush=True)
    gpu = f"GPU {torch.cuda.get_device_name()}" if a.device == 'cuda' else 'no GPU'
    head = (f"# Cached decoding\n\n{machine_info()['cpu']}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
            f"{a.threads} thread(s), {gpu}; {datetime.date.today()}\n\nReal tokens teacher forced, fp32, batch 1, sdpa; "
            f"medians of {a.repeats} repeats after a warm-up.\n\n")
    table = (f"## Cached vs full recompute\n\nModel `{a.size}`, CPU; {a.steps} cached steps, {a.full_steps} full steps per repeat.\n\n"
             "| preset | context | cached tok/s | full recompute tok/s | speed-up |\n|---|---:|---:|---:|---:|\n")
    table += ''.join(f"| {p} | {c} | {x:.1f} | {y:.2f} | {x / y:.0f}x |\n" for p, c, x, y in rows)
    if crows:
        graphs_note = 'CUDA graphs' if mode == 'reduce-overhead' else "on CUDA, mode='reduce-overhead' adds CUDA graphs"
        table += (f"\n## Eager vs compiled one-token step\n\n`museformer` masks on {a.device}; {a.compile_steps} one-token steps per "
                  f"repeat (`IncrementalDecoder.feed`, host work included), eager and compiled repeats interleaved. Compiled: "
                  f"`IncrementalDecoder.compile_step({f'mode={mode!r}' if mode else ''})` (inductor; {graphs_note}). "
                  "Closing steps: timed steps whose token closes a segment (its summary is computed in that step). Graphs: compiled "
                  "in the warm-up, which runs on to the first closing step (one graph for steps without and one for steps with a "
                  "closing segment); new: compiled during "
                  "the timed repeats, i.e. recompiles (0: none). Warm-up: one eager and one compiled decode, compiling included. "
                  "Rel diff: max |compiled - eager| / max |eager logit| over the warm-up steps.\n\n"
                  "| size | context | eager tok/s | compiled tok/s | compiled / eager | closing steps | graphs | new | warm-up s | rel diff |\n"
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        table += ''.join(f"| {s} | {c} | {e:.1f} | {x:.1f} | {x / e:.2f}x | {k} | {g} | {n} | {w:.0f} | {r:.0e} |\n"
                         for s, c, e, x, k, g, n, w, r in crows)
    print(table)
    out = Path(a.out) if a.out else Path(__file__).parent / 'results' / ('generate.md' if a.device == 'cpu' else f'generate_{a.device}.md')
    out.parent.mkdir(parents=True, exist_ok=True); out.write_text(head + table)

if __name__ == '__main__': main()
