#!/usr/bin/env python
"""Loader throughput and memory per worker for meloformer.data.

For each corpus (the embedded demo corpus; the real multi-track files of shared/midi when present) and for
0 and 2 DataLoader workers, at max_seq_len 8192: real (non-padding) tokens per second delivered to the
training loop, padded slots per second, padding waste, and the resident memory (RSS, and PSS/USS from
/proc/PID/smaps_rollup) of each worker process. Median of several timed passes after a warm-up pass.
The anchor is the release's measured training throughput, about 10k tokens/s; the goal is >= 500k tokens/s
per worker. Prints a markdown table and writes it to bench/results/data.md.

    python bench/data.py [--seconds 3] [--repeats 3] [--batch_size 4] [--max_seq_len 8192]
"""
import argparse, datetime, os, statistics, sys, tempfile, time
from pathlib import Path


from meloformer.data import build_corpus, prepare_demo, ShardDataset, make_loader
from meloformer.tokenizer import sample_midi_dir
from _common import machine

RELEASE_TOKENS_PER_S = 10_000




def memory_mb(pid: int) -> dict:
    "RSS from /proc/PID/status; PSS and USS (private) from /proc/PID/smaps_rollup, in MiB."
    out = {}
    for line in open(f'/proc/{pid}/status'):
        if line.startswith('VmRSS:'): out['rss'] = int(line.split()[1]) / 1024
    try:
        fields = {l.split(':')[0]: int(l.split()[1]) for l in open(f'/proc/{pid}/smaps_rollup') if l.split()[-1] == 'kB'}
        out['pss'] = fields.get('Pss', 0) / 1024
        out['uss'] = (fields.get('Private_Clean', 0) + fields.get('Private_Dirty', 0)) / 1024
    except OSError: pass
    return out


def timed_pass(ds, workers: int, batch_size: int, seconds: float, epoch0: int):
    "Read batches for about `seconds` from one loader (persistent workers, cycling epochs); returns real tokens, slots, seconds, worker memory."
    loader = make_loader(ds, batch_size, seed=0, epoch=epoch0, num_workers=workers, persistent_workers=workers > 0)
    real = slots = 0
    epoch, mem = epoch0, []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loader.batch_sampler.set_epoch(epoch)
        it = iter(loader)
        for batch in it:
            real += int((batch['doc'] >= 0).sum()); slots += batch['ids'].numel()
            if workers and not mem: mem = [memory_mb(w.pid) for w in it._workers]
        epoch += 1
    elapsed = time.perf_counter() - t0
    del it, loader
    return real, slots, elapsed, mem, epoch


def bench(name, ds, workers, batch_size, seconds, repeats):
    _, _, _, _, epoch = timed_pass(ds, workers, batch_size, min(seconds, 1.0), 0)       # warm-up: page cache, imports
    runs = [timed_pass(ds, workers, batch_size, seconds, epoch + 100 * r) for r in range(repeats)]
    tps = statistics.median(r[0] / r[2] for r in runs)
    sps = statistics.median(r[1] / r[2] for r in runs)
    mem = runs[-1][3]
    waste = 1 - sum(r[0] for r in runs) / sum(r[1] for r in runs)
    per_worker = tps / max(workers, 1)
    fmt = lambda key: ' / '.join(f"{m[key]:.0f}" for m in mem) if mem and key in mem[0] else '-'
    return dict(corpus=name, workers=workers, tokens_s=tps, slots_s=sps, per_worker=per_worker, waste=100 * waste,
                rss=fmt('rss'), pss=fmt('pss'), uss=fmt('uss'), vs_release=tps / RELEASE_TOKENS_PER_S,
                goal='yes' if per_worker >= 500_000 else 'no')


def main():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.split('\n')[0])
    p.add_argument('--seconds', type=float, default=3.0, help="length of one timed pass")
    p.add_argument('--repeats', type=int, default=3, help="timed passes per setting (median reported)")
    p.add_argument('--batch_size', type=int, default=4)
    p.add_argument('--max_seq_len', type=int, default=8192)
    p.add_argument('--out', default=str(Path(__file__).parent/'results'/'data.md'))
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix='meloformer-bench-data-'))
    corpora = [('demo (349 chorales, 4 tracks)', ShardDataset(prepare_demo(tmp/'demo'), 'all', args.max_seq_len, transpose=5))]
    midi = sample_midi_dir()
    if midi is not None:
        build_corpus(midi, tmp/'shared', workers=2, progress=False)
        corpora.append(('shared/midi (16 pop/piano, 1-13 tracks, cropped)', ShardDataset(tmp/'shared', 'all', args.max_seq_len, transpose=5)))

    main_mem = memory_mb(os.getpid())
    rows = [bench(name, ds, w, args.batch_size, args.seconds, args.repeats) for name, ds in corpora for w in (0, 2)]
    header = (f"# Data loader throughput\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}\n\n"
              f"max_seq_len {args.max_seq_len}, batch {args.batch_size} rows, packed rows, transposition on; "
              f"median of {args.repeats} passes of {args.seconds:.0f} s after a warm-up, one loader per pass (persistent workers, epochs cycled with set_epoch; worker start-up is inside the timed pass). tokens/s counts real (non-padding) "
              f"tokens delivered to the loop; slots/s includes padding. Main process RSS before the loaders: "
              f"{main_mem['rss']:.0f} MiB. Worker memory: RSS / PSS / USS (private) in MiB, per worker. "
              f"Anchor: the release's ~{RELEASE_TOKENS_PER_S // 1000}k tokens/s training throughput. Goal: >= 500k tokens/s per worker. "
              f"With {os.cpu_count()} cores, the 2-worker rows share the CPUs between the workers and the main process that "
              f"receives the batches, so they measure contention as much as the loader; the 0-worker rows are one process's capacity.\n")
    table = ["| corpus | workers | tokens/s | slots/s | tokens/s per worker | x release | goal met | padding % | worker RSS MiB | worker PSS MiB | worker USS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['corpus']} | {r['workers']} | {r['tokens_s']:,.0f} | {r['slots_s']:,.0f} | {r['per_worker']:,.0f} | "
                     f"{r['vs_release']:.0f} | {r['goal']} | {r['waste']:.1f} | {r['rss']} | {r['pss']} | {r['uss']} |")
    text = header + '\n' + '\n'.join(table) + '\n'
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == '__main__':
    main()
