"""Cached decoding vs recomputing the full sequence each step: tokens/s at contexts of 1k and 4k tokens on CPU.

Both decode the same real token stream (teacher forced, so no sampling noise): the cached decoder prefills
the context and then appends one token per step; the anchor runs the whole model on the context plus the
new token for every step. Median of repeats after a warm-up, measured in the same run.
Usage: python bench/generate.py [--size tiny] [--threads 1] [--steps 32] [--repeats 5]
"""
import argparse, datetime, os, statistics, time
from pathlib import Path
import numpy as np
import torch
from meloformer.tokenizer import HIDTokenizer, sample_midi_dir
from meloformer.data import demo_midi_dir
from meloformer.model import MeloFormer, ModelConfig
from meloformer.attention import MaskConfig
from meloformer.generate import IncrementalDecoder
from _common import machine_info

def stream(tok, n: int) -> np.ndarray:
    "A real token stream of at least n tokens (a shared multitrack piece, else demo pieces back to back)."
    shared = sample_midi_dir()
    files = sorted((shared / 'multitrack').glob('*.mid')) if shared else []
    for f in files:
        ids = tok.encode(f)
        if len(ids) >= n: return ids[:n]
    ids = np.concatenate([tok.encode(f)[:-1] for f in sorted(demo_midi_dir().glob('*.mid'))])
    return ids[:n]

@torch.no_grad()
def cached_tps(model, tok, ids, ctx, steps, repeats):
    times = []
    for r in range(repeats + 1):                         # the first is the warm-up
        dec = IncrementalDecoder(model, tok, 1, max_len=ctx + steps + 8, max_segments=int(tok.annotate(ids)['seg'].max()) + 2)
        dec.feed(ids[None, :ctx])
        t0 = time.perf_counter()
        for i in range(ctx, ctx + steps): dec.feed(ids[None, i:i + 1])
        if r: times.append((time.perf_counter() - t0) / steps)
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

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', default='tiny'); p.add_argument('--threads', type=int, default=1)
    p.add_argument('--steps', type=int, default=16, help="decoded tokens per repeat (cached)")
    p.add_argument('--full_steps', type=int, default=2, help="decoded tokens per repeat (full recompute)")
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--contexts', type=int, nargs='+', default=[1024, 4096])
    p.add_argument('--presets', nargs='+', default=['museformer', 'dense'])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = HIDTokenizer()
    ids = stream(tok, max(a.contexts) + a.steps + 1)
    rows = []
    for preset in a.presets:
        torch.manual_seed(0)
        model = MeloFormer(ModelConfig.from_size(a.size, mask=MaskConfig.from_preset(preset), attn_backend='sdpa')).eval()
        for ctx in a.contexts:
            c = cached_tps(model, tok, ids, ctx, a.steps, a.repeats)
            f = full_tps(model, tok, ids, ctx, a.full_steps, a.repeats)
            rows.append((preset, ctx, c, f, c / f))
            print(f"{preset} ctx {ctx}: cached {c:.1f} tok/s, full recompute {f:.2f} tok/s, {c / f:.0f}x", flush=True)
    head = (f"# Cached decoding vs full recompute\n\n{machine_info()['cpu']}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
            f"{a.threads} thread(s), no GPU; {datetime.date.today()}\n\nModel `{a.size}` (sdpa, fp32, batch 1), real tokens teacher forced; "
            f"median of {a.repeats} repeats after a warm-up ({a.steps} cached steps, {a.full_steps} full steps per repeat).\n\n")
    table = "| preset | context | cached tok/s | full recompute tok/s | speed-up |\n|---|---:|---:|---:|---:|\n"
    table += ''.join(f"| {p} | {c} | {x:.1f} | {y:.2f} | {x / y:.0f}x |\n" for p, c, x, y, _ in rows)
    print(table)
    out = Path(__file__).parent / 'results'; out.mkdir(exist_ok=True)
    (out / 'generate.md').write_text(head + table)

if __name__ == '__main__': main()
