"""Soak at scale: a corpus of many thousand MIDI files built with 2 workers (one `kill -9` mid-build, then a re-run
that must end identical to a clean build), and a long `tiny` training run on it with a real eval/save cadence,
killed twice with `kill -9` and resumed with `--resume auto` (per-step wall time and RSS over the first and last
steps, checkpoints bounded by `--keep_checkpoints`, one metrics row per step), plus bit-exact final weights of a
shorter killed-and-resumed run against an uninterrupted one.

Not a test: the full size (20,000 files, 20,000 steps, 2,000 short steps) takes one to two hours on a shared 2-core CPU
(the training runs, at ~0.16 s a step; the corpus part takes about a minute).

    python bench/soak.py                                        # full size
    python bench/soak.py --files 500 --steps 600 --short_steps 200   # scaled down, a few minutes
"""
import argparse, csv, hashlib, itertools, json, os, shutil, signal, subprocess, sys, tempfile, time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / 'results'
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))

# ---------------------------------------------------------------- corpus

TRANSPOSE = [0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6]
TEMPO = [1.0, 0.8, 1.25, 0.9, 1.1]
CROP = [None, (0, 8), (4, 8), (8, 8), (0, 16), (2, 12)]     # (first bar, bars) of 4 quarters; None: whole piece


def sources() -> list[Path]:
    "shared/midi's multitrack + one_track files (else the written sample files) and the demo chorales."
    from meloformer.tokenizer import sample_midi_dir, write_sample_midi, demo_midi_dir
    d, out = sample_midi_dir(), []
    if d is not None:
        for sub in ('multitrack', 'one_track'): out += sorted((d / sub).rglob('*.mid')) + sorted((d / sub).rglob('*.midi'))
    if not out:
        w = write_sample_midi(Path(tempfile.mkdtemp(prefix='soak-sample-')))
        out = list(w['multitrack']) + list(w['one_track'])
    return out + sorted(Path(demo_midi_dir()).glob('*.mid'))


def _variant(job):
    "Write one variant (transposition, tempo scale, bar-window crop) of one source; returns its sha1 or None."
    from symusic import Score
    src, dst, k, tempo, crop = job
    s = Score(str(src))
    if crop is not None:
        bar = 4 * s.ticks_per_quarter
        a, b = crop[0] * bar, (crop[0] + crop[1]) * bar
        if a >= s.end(): return None
        s = s.clip(a, b, clip_end=True).shift_time(-a)
        if s.note_num() == 0: return None
    if k:
        for t in s.tracks:
            if not t.is_drum: t.shift_pitch(k, inplace=True)
    if tempo != 1.0:
        for t in s.tempos: t.qpm = t.qpm * tempo
    s.dump_midi(str(dst))
    return hashlib.sha1(Path(dst).read_bytes()).hexdigest()


def make_corpus(n: int, out: Path) -> dict:
    "Write `n` distinct files into `out` (round robin over sources x variants); returns counts and seconds."
    srcs = sources()
    out.mkdir(parents=True, exist_ok=True)
    variants = list(itertools.product(TRANSPOSE, TEMPO, CROP))
    t0, seen, i = time.perf_counter(), set(), 0
    jobs_iter = ((s, v) for v in variants for s in srcs)        # every source's first variant, then the next ...
    with Pool(2) as pool:
        while len(seen) < n:
            batch = list(itertools.islice(jobs_iter, max(64, (n - len(seen)) * 11 // 10)))
            if not batch: raise SystemExit(f"soak: only {len(seen)} distinct files can be made from {len(srcs)} sources")
            jobs = []
            for s, (k, tempo, crop) in batch:
                jobs.append((s, out / f'{i:06d}_{s.stem[:40]}_t{k:+d}_x{tempo}_c{crop[0] if crop else "all"}-{crop[1] if crop else ""}.mid', k, tempo, crop)); i += 1
            for (s, dst, *_), h in zip(jobs, pool.map(_variant, jobs, chunksize=32)):
                if h is None or h in seen or len(seen) >= n:
                    if dst.exists(): dst.unlink()
                    continue
                seen.add(h)
    return dict(files=len(seen), sources=len(srcs), seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------- processes

def _children(pid: int) -> list[int]:
    out = []
    try:
        for t in os.listdir(f'/proc/{pid}/task'):
            try: out += [int(c) for c in open(f'/proc/{pid}/task/{t}/children').read().split()]
            except OSError: pass
    except OSError: pass
    return out


def tree_cpu(pid: int) -> float:
    "User + system CPU seconds of a process and its live descendants, from /proc (0 once gone)."
    tot, todo, tck = 0.0, [pid], os.sysconf('SC_CLK_TCK')
    while todo:
        q = todo.pop()
        try: f = open(f'/proc/{q}/stat').read().rsplit(')', 1)[1].split()
        except OSError: continue
        tot += (int(f[11]) + int(f[12])) / tck
        todo += _children(q)
    return tot


def tree_rss(pid: int) -> int:
    "RSS of a process and all its descendants, bytes, from /proc (0 once gone)."
    tot, todo = 0, [pid]
    while todo:
        q = todo.pop()
        try:
            for line in open(f'/proc/{q}/status'):
                if line.startswith('VmRSS:'): tot += int(line.split()[1]) * 1024; break
        except OSError: continue
        todo += _children(q)
    return tot


def start(cmd, log):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill9(p):
    "kill -9 the whole process group (the trainer / builder and its workers)."
    try: os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError: pass
    p.wait()


def build(src, out, log, fps, kill_after=None):
    "Run `python -m meloformer.data SRC OUT --workers 2`; returns seconds, peak tree RSS, rc, killed."
    p = start([sys.executable, '-m', 'meloformer.data', str(src), str(out), '--workers', '2', '--files_per_shard', str(fps), '--no_progress'], log)
    ps, peak, t0, killed = p.pid, 0, time.perf_counter(), False
    while p.poll() is None:
        peak = max(peak, tree_rss(ps))
        if kill_after is not None and time.perf_counter() - t0 > kill_after:
            kill9(p); killed = True; break
        time.sleep(0.2)
    return dict(seconds=time.perf_counter() - t0, peak_rss=peak, rc=p.returncode, killed=killed)


def shard_digest(out: Path) -> dict:
    "meta counts plus a hash over every shard's arrays (tokens, segments, bars, table, hashes)."
    meta = json.loads((out / 'meta.json').read_text())
    h = hashlib.sha1()
    for name in meta['shards']:
        for a in sorted((out / 'shards' / name).glob('*.npy')):
            x = np.load(a); h.update(a.name.encode()); h.update(str(x.dtype).encode()); h.update(np.ascontiguousarray(x).tobytes())
    return dict(complete=meta.get('complete'), files=meta.get('files'), skipped=meta.get('skipped'), duplicates=meta.get('duplicates'),
                counts=meta.get('counts'), shards=list(meta['shards']), arrays=h.hexdigest())


# ---------------------------------------------------------------- training

def last_step(metrics: Path) -> int:
    "Step of the last row of metrics.csv (-1 when there is none yet)."
    try:
        with open(metrics, 'rb') as f:
            f.seek(0, 2); n = f.tell(); f.seek(max(0, n - 2048)); tail = f.read().decode(errors='replace')
    except OSError: return -1
    for line in reversed(tail.strip().splitlines()):
        try: return int(line.split(',', 1)[0])
        except ValueError: continue
    return -1


def train(data, out, steps, log, kills=(), args=None):
    """Train `tiny` for `steps` steps into `out`, `kill -9` when the last logged step reaches each of `kills`, resume with
    `--resume auto`. Returns per-step samples (step, wall time first seen, tree RSS), the most checkpoints seen, restarts."""
    cmd = [sys.executable, '-m', 'meloformer.train', '--data_dir', str(data), '--out_dir', str(out), '--model_size', 'tiny',
           '--max_seq_len', '256', '--batch_size', '1', '--max_steps', str(steps), '--eval_every', str(args.eval_every),
           '--save_every', str(args.save_every if out.name != 'short' else min(args.save_every, max(1, steps // 4))),
           '--keep_checkpoints', str(args.keep), '--phases', 'none', '--device', 'cpu', '--attn_backend', 'sdpa',
           '--seed', '0', '--no-progress', '--resume', 'auto']
    metrics = out / 'metrics.csv'
    seen, cpu, rss, max_ckpt, restarts, kills = {}, {}, [], 0, 0, list(kills)
    t_begin = time.perf_counter()
    while True:
        p = start(cmd, log); ps = p.pid; killed = False
        while p.poll() is None:
            s = last_step(metrics); now = time.perf_counter() - t_begin
            if s >= 0 and s not in seen: seen[s] = now; cpu[s] = (restarts, tree_cpu(ps))
            r = tree_rss(ps)
            if r: rss.append((now, s, r))
            max_ckpt = max(max_ckpt, len(list(out.glob('ckpt-*.pt'))))
            if kills and s >= kills[0]:
                kill9(p); kills.pop(0); killed = True; restarts += 1; break
            time.sleep(0.1)
        if not killed:
            if p.returncode != 0: raise SystemExit(f"soak: training in {out} exited {p.returncode}, see {log.name}")
            break
    max_ckpt = max(max_ckpt, len(list(out.glob('ckpt-*.pt'))))
    return dict(seen=seen, cpu=cpu, rss=rss, max_ckpt=max_ckpt, restarts=restarts, seconds=time.perf_counter() - t_begin)


def window(res, lo, hi):
    """Mean wall seconds and CPU seconds (trainer process tree) per step over steps lo..hi (times when each step's row was
    first seen) and median tree RSS MiB sampled in that window."""
    ts, cs, nan = res['seen'], res['cpu'], float('nan')
    a = min((s for s in ts if s >= lo), default=None); b = max((s for s in ts if s <= hi), default=None)
    if a is None or b is None or b <= a: return nan, nan, nan
    rs = [r for t, s, r in res['rss'] if a <= s <= b]
    c = (cs[b][1] - cs[a][1]) / (b - a) if cs[a][0] == cs[b][0] else nan     # same process only
    return (ts[b] - ts[a]) / (b - a), c, (float(np.median(rs)) / 2**20 if rs else nan)


def rows_check(metrics: Path, steps: int) -> dict:
    rows = list(csv.DictReader(open(metrics)))
    tr = [int(r['step']) for r in rows if r.get('loss')]
    va = [int(r['step']) for r in rows if r.get('val_loss')]
    return dict(rows=len(rows), train_rows=len(tr), train_unique=len(set(tr)), train_expected=steps,
                train_exact=sorted(tr) == list(range(1, steps + 1)), val_rows=len(va), val_unique=len(set(va)),
                mem_first=[float(r['mem_mb']) for r in rows if r.get('mem_mb')][:1], rowsd=rows)


def weights_equal(a: Path, b: Path):
    from safetensors.torch import load_file
    import torch
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys(): return False, float('inf'), len(x)
    diff = max(float((x[k].float() - y[k].float()).abs().max()) if x[k].numel() else 0.0 for k in x)
    return all(torch.equal(x[k], y[k]) for k in x), diff, len(x)


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--files', type=int, default=20000, help='distinct MIDI files in the corpus')
    ap.add_argument('--steps', type=int, default=20000, help='optimizer steps of the long run (killed twice, resumed); 0: skip it')
    ap.add_argument('--short_steps', type=int, default=2000, help='steps of the bit-exactness run (killed once vs uninterrupted); 0: skip it')
    ap.add_argument('--data', default=None, help='train on this folder built by `python -m meloformer.data` and skip the corpus part')
    ap.add_argument('--window', type=int, default=1000, help='steps in the first/last timing windows (capped at steps/4)')
    ap.add_argument('--files_per_shard', type=int, default=None, help='--files_per_shard of the build (default: files/10, 25..1000)')
    ap.add_argument('--eval_every', type=int, default=1000)
    ap.add_argument('--save_every', type=int, default=500)
    ap.add_argument('--keep', type=int, default=3, help='--keep_checkpoints')
    ap.add_argument('--work', default=None, help='scratch folder (default: a temp dir, removed afterwards)')
    ap.add_argument('--keep_work', action='store_true', help='do not remove the scratch folder')
    ap.add_argument('--out', default=str(RESULTS / 'soak.md'))
    args = ap.parse_args()
    if args.data is not None and not (Path(args.data) / 'meta.json').is_file():
        raise SystemExit(f"soak: --data {args.data}: no meta.json there (not a folder built by `python -m meloformer.data`)")
    work = Path(args.work or tempfile.mkdtemp(prefix='meloformer-soak-')); work.mkdir(parents=True, exist_ok=True)
    logf = open(work / 'soak.log', 'a')
    say = lambda *a: print(*a, flush=True)
    say(f"soak: work folder {work}")
    N, S = args.steps, args.short_steps
    W = max(1, min(args.window, N // 4))
    pct = lambda x, y: f"{(y / x - 1) * 100:+.1f}%" if x and y else '-'
    flat = lambda x, y: ('yes' if abs(y / x - 1) <= 0.10 else 'no') if x and y else '-'
    nfiles = args.files if args.data is None else json.loads((Path(args.data) / 'meta.json').read_text()).get('files')
    sections = {'corpus': None, 'long': None, 'short': None}
    pending = dict(corpus="not measured in this run" + (f" (trained on `--data {args.data}`)" if args.data else " (stopped before it ended)"),
                   long="not measured in this run" + (" (`--steps 0`)" if not N else " (stopped before it ended)"),
                   short="not measured in this run" + (" (`--short_steps 0`)" if not S else " (stopped before it ended)"))
    titles = dict(corpus="## Corpus build", long="## Long training run", short="## Bit-exact resume (short run)")

    def write():
        "Write what has been measured so far (the file is rewritten after each part, so a stopped run keeps its parts)."
        head = [f"# Soak: corpus build and long training run", "",
                f"{machine()}; sizes: **{nfiles:,} files, {N:,} steps (long run), {S:,} steps (short run)**" + (f"; timing windows: first and last {W:,} steps." if N else "."), ""]
        if min(nfiles or 0, N) < 20000 or S < 2000 or args.data:
            head += [f"**Scaled down**: the full soak is 20,000 files, a 20,000-step long run and a 2,000-step short run; this run measured "
                     f"{nfiles:,} files, {N:,} steps and {S:,} steps (`python bench/soak.py {' '.join(sys.argv[1:])}`).", ""]
        body = []
        for key in ('corpus', 'long', 'short'):
            body += sections[key] if sections[key] else [titles[key], "", pending[key] + ".", ""]
        text = '\n'.join(head + body)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix('.tmp'); tmp.write_text(text); os.replace(tmp, args.out)
        return text

    try:
        # 1. corpus
        if args.data is None:
            src = work / 'midi'
            if src.exists(): shutil.rmtree(src)
            c = make_corpus(args.files, src)
            fps = args.files_per_shard or min(1000, max(25, args.files // 10))
            say(f"corpus: {c['files']} files from {c['sources']} sources in {c['seconds']:.1f} s")
            clean = build(src, work / 'clean', logf, fps)
            if clean['rc'] != 0: raise SystemExit(f"soak: clean build exited {clean['rc']}")
            say(f"clean build: {clean['seconds']:.1f} s, peak RSS {clean['peak_rss'] / 2**20:.0f} MiB")
            k = build(src, work / 'resumed', logf, fps, kill_after=clean['seconds'] / 2)
            shards_at_kill = len(list((work / 'resumed' / 'shards').glob('shard-*'))) if (work / 'resumed' / 'shards').exists() else 0
            r = build(src, work / 'resumed', logf, fps)
            if r['rc'] != 0: raise SystemExit(f"soak: re-run build exited {r['rc']}")
            dc, dr = shard_digest(work / 'clean'), shard_digest(work / 'resumed')
            same = dc == dr
            say(f"killed build at {k['seconds']:.1f} s ({shards_at_kill} shard folders), re-run {r['seconds']:.1f} s; identical: {same}")
            data = work / 'clean'
            sections['corpus'] = [
                f"## Corpus build (`python -m meloformer.data SRC OUT --workers 2 --files_per_shard {fps}`)", "",
                f"{c['files']:,} distinct files (by content hash) written with symusic from {c['sources']} sources (shared/midi multitrack + one_track and the "
                f"349 demo chorales) by transposition (0, +-1..+-5, +6 semitones, drums kept), tempo scaling (x0.8-1.25) and 4/4 bar-window crops, in {c['seconds']:.1f} s (2 processes).", "",
                "| build | seconds | files/s | peak RSS MiB (process tree) | exit |",
                "|---|---:|---:|---:|---|",
                f"| clean | {clean['seconds']:.1f} | {c['files'] / clean['seconds']:,.0f} | {clean['peak_rss'] / 2**20:,.0f} | {clean['rc']} |",
                f"| killed (`kill -9` of the process group at half the clean time) | {k['seconds']:.1f} | - | {k['peak_rss'] / 2**20:,.0f} | -9 ({shards_at_kill} of {len(dc['shards'])} shard folders existed) |",
                f"| re-run into the killed folder | {r['seconds']:.1f} | - | {r['peak_rss'] / 2**20:,.0f} | {r['rc']} |", "",
                f"Re-run identical to the clean build (meta counts, shard list and a hash over every shard array): **{'yes' if same else 'NO'}**; "
                f"meta: complete {dc['complete']}, files {dc['files']}, skipped {dc['skipped']}, duplicates {dc['duplicates']}, "
                f"train pieces {dc['counts']['train']['pieces']:,} / tokens {dc['counts']['train']['tokens']:,}, valid pieces {dc['counts']['valid']['pieces']:,}.", ""]
            write()
        else:
            data = Path(args.data).resolve()

        # 2. bit-exactness on the short run
        if S:
            a = train(data, work / 'short_a' / 'short', S, logf, (), args)
            b = train(data, work / 'short_b' / 'short', S, logf, (int(S * 0.6),), args)
            eq, diff, ntens = weights_equal(work / 'short_a' / 'short' / 'model' / 'model.safetensors', work / 'short_b' / 'short' / 'model' / 'model.safetensors')
            say(f"short run {S} steps ({b['restarts']} kill): uninterrupted {a['seconds']:.0f} s, killed+resumed {b['seconds']:.0f} s; bit-exact: {eq} (max abs diff {diff:.3g})")
            sections['short'] = [
                titles['short'], "",
                f"Two runs of {S:,} steps on the same data, `--save_every {min(args.save_every, max(1, S // 4))}`: one uninterrupted ({a['seconds']:.0f} s), "
                f"one killed with `kill -9` at step {int(S * 0.6)} and resumed with `--resume auto` ({b['seconds']:.0f} s).", "",
                "| compared | tensors | bit-exact | max abs diff |",
                "|---|---:|---|---:|",
                f"| `model/model.safetensors` | {ntens} | {'yes' if eq else 'NO'} | {diff:.3g} |", ""]
            write()

        # 3. the long soak
        if N:
            L = train(data, work / 'long', N, logf, (int(N * 0.35), int(N * 0.6)), args)
            first = window(L, 1, W); last = window(L, N - W, N)
            rc = rows_check(work / 'long' / 'metrics.csv', N)
            mem = [(int(x['step']), float(x['mem_mb'])) for x in rc['rowsd'] if x.get('mem_mb')]
            mf = np.median([m for s, m in mem if s <= W]); ml = np.median([m for s, m in mem if s > N - W])
            tok = [(int(x['step']), float(x['tokens_per_s'])) for x in rc['rowsd'] if x.get('tokens_per_s')]
            tf = np.median([m for s, m in tok if s <= W]); tl = np.median([m for s, m in tok if s > N - W])
            say(f"long run {N} steps in {L['seconds']:.0f} s, {L['restarts']} kills: s/step, CPU s/step, RSS first {first} last {last}")
            sections['long'] = [
                titles['long'], "",
                f"`python -m meloformer.train --model_size tiny --max_seq_len 256 --batch_size 1 --max_steps {N} --eval_every {args.eval_every} "
                f"--save_every {args.save_every} --keep_checkpoints {args.keep} --phases none --device cpu --attn_backend sdpa --resume auto` on the "
                f"{'clean build' if args.data is None else '`--data` folder'}; "
                f"`kill -9` (process group) at steps {int(N * 0.35)} and {int(N * 0.6)}, each time resumed with `--resume auto`; {L['seconds']:.0f} s in all.", "",
                "| window | steps | wall s/step (mean) | CPU s/step (trainer tree, mean) | RSS MiB (process tree from /proc, median) | RSS MiB (metrics.csv mem_mb, median) | trainer tokens/s (metrics.csv, median) |",
                "|---|---|---:|---:|---:|---:|---:|",
                f"| first | 1-{W} | {first[0]:.4f} | {first[1]:.4f} | {first[2]:.0f} | {mf:.0f} | {tf:,.0f} |",
                f"| last | {N - W}-{N} | {last[0]:.4f} | {last[1]:.4f} | {last[2]:.0f} | {ml:.0f} | {tl:,.0f} |",
                f"| last vs first | | {pct(first[0], last[0])} (flat within 10%: {flat(first[0], last[0])}) | {pct(first[1], last[1])} (flat: {flat(first[1], last[1])}) | {pct(first[2], last[2])} (flat: {flat(first[2], last[2])}) | {pct(mf, ml)} (flat: {flat(mf, ml)}) | {pct(tf, tl)} |", "",
                "Wall time per step is from the moment each step's row first appears in metrics.csv (polled every 0.1 s), so it includes "
                "the evaluations and checkpoints inside the window and whatever else the shared machine runs at the time "
                f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); CPU seconds of the trainer's own process tree are "
                "much less sensitive to other work on the machine.", "",
                "| check | result |",
                "|---|---|",
                f"| most `ckpt-*.pt` files seen at once (polled every 0.1 s) | {L['max_ckpt']} (`--keep_checkpoints {args.keep}`: {'bounded' if L['max_ckpt'] <= args.keep else 'EXCEEDED'}) |",
                f"| metrics.csv train rows | {rc['train_rows']:,} rows, {rc['train_unique']:,} distinct steps, expected {N:,}; exactly one per step 1..{N}: {'yes' if rc['train_exact'] else 'NO'} |",
                f"| metrics.csv validation rows | {rc['val_rows']} rows, {rc['val_unique']} distinct steps |",
                f"| kills / resumes | {L['restarts']} |", ""]
    finally:
        logf.close()
    print(write())
    if not args.keep_work and not args.work: shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
