"""Music metrics: MeloFormer's `meloformer.evaluate` against MusPy's reference implementation.

Computes the metrics that have a published MusPy definition (pitch_class_entropy, scale_consistency,
n_pitch_classes_used, pitch_range, polyphony, empty_beat_rate, groove_consistency) on real files, four demo
chorales and seven files of `shared/midi` (multi-track pop, a meter-changing etude, a pedalled piano
performance, a POP909 song with meter changes), with both libraries in the same run; prints a markdown table
of the differences and the time each library takes, and writes it to bench/results/metrics_vs_muspy.md.

    python bench/metrics_vs_muspy.py [--midi DIR] [--repeats 3]

Needs `pip install muspy` (unmaintained since 2022; not a MeloFormer dependency).
"""
import argparse, datetime, math, warnings
from pathlib import Path

import numpy as np

from meloformer import metrics as ev
from meloformer.tokenizer import read_piece, sample_midi_dir
from meloformer.data import demo_midi_dir
from _common import machine, median_time

SHARED = ['multitrack/Aicha.mid', 'multitrack/Funkytown.mid', 'multitrack/I Gotta Feeling.mid', 'multitrack/In Too Deep.mid',
          'one_track/6338816_Etude No. 4.mid', 'one_track/Maestro_1.mid', 'one_track/POP909_010.mid']






def measure_ticks(piece) -> int:
    "MusPy's groove needs one measure length: the first time signature's bar, in ticks."
    num, den = (piece.time_signatures[0, 1:] if len(piece.time_signatures) else (4, 4))
    return int(piece.ticks_per_quarter * 4 * num // den)


def ours(piece, music24=None):
    return dict(pitch_class_entropy=ev.pitch_class_entropy(piece), scale_consistency=ev.scale_consistency(piece),
                n_pitch_classes_used=ev.n_pitch_classes_used(piece), pitch_range=ev.pitch_range(piece),
                polyphony=ev.polyphony(piece), empty_beat_rate=ev.empty_beat_rate(piece),
                groove_native=ev.groove_consistency(piece, resolution=piece.ticks_per_quarter),
                groove_24=ev.groove_consistency(piece, resolution=24))


def theirs(muspy, music, music24, measure):
    return dict(pitch_class_entropy=muspy.pitch_class_entropy(music), scale_consistency=muspy.scale_consistency(music),
                n_pitch_classes_used=muspy.n_pitch_classes_used(music), pitch_range=muspy.pitch_range(music),
                polyphony=muspy.polyphony(music), empty_beat_rate=muspy.empty_beat_rate(music),
                groove_native=muspy.groove_consistency(music, measure),
                groove_24=muspy.groove_consistency(music24, measure * 24 // music.resolution))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--midi', default=None, help="the shared/midi folder (default: found beside the repository)")
    ap.add_argument('--repeats', type=int, default=3, help="timed repeats (median reported)")
    ap.add_argument('--out', default=str(Path(__file__).parent/'results'/'metrics_vs_muspy.md'))
    args = ap.parse_args()
    warnings.filterwarnings('ignore')
    try: import muspy
    except ImportError: raise SystemExit("muspy is not installed: pip install muspy")

    root = Path(args.midi) if args.midi else sample_midi_dir()
    files = sorted(demo_midi_dir().glob('*.mid'))[:4]
    if root is None: print("shared/midi not found: demo chorales only")
    else: files += [root/f for f in SHARED if (root/f).exists()]

    pieces = [read_piece(f) for f in files]
    musics = [muspy.read_midi(f) for f in files]
    musics24 = [muspy.read_midi(f).adjust_resolution(24) for f in files]
    measures = [measure_ticks(p) for p in pieces]
    a = [ours(p) for p in pieces]
    b = [theirs(muspy, m, m24, mt) for m, m24, mt in zip(musics, musics24, measures)]
    keys = list(a[0])
    diff = np.array([[abs(x[k] - y[k]) if not (math.isnan(x[k]) and math.isnan(y[k])) else 0.0 for k in keys] for x, y in zip(a, b)])

    t_ours = median_time(lambda: [ours(p) for p in pieces], args.repeats)
    t_muspy = median_time(lambda: [theirs(muspy, m, m24, mt) for m, m24, mt in zip(musics, musics24, measures)], args.repeats)
    n_notes = sum(sum(len(t.notes) for t in p.tracks) for p in pieces)

    lines = ["# Music metrics vs MusPy", "",
             f"{datetime.date.today()} on {machine()}; muspy {muspy.__version__}; {len(files)} files, {n_notes:,} notes; "
             f"pieces read once by each library (MeloFormer: `read_piece` via symusic, MusPy: `muspy.read_midi`), "
             f"metrics timed alone, median of {args.repeats} repeats after a warm-up.", "",
             "`groove_native`: groove consistency at the file's own resolution (MusPy's measure = first time signature's bar in "
             "ticks); `groove_24`: at 24 steps per quarter (MusPy after `adjust_resolution(24)`).", "",
             "## Agreement per metric", "",
             "| metric | files equal (abs diff < 1e-9) | max abs diff | mean ours | mean MusPy |", "|---|---:|---:|---:|---:|"]
    for j, k in enumerate(keys):
        lines.append(f"| {k} | {(diff[:, j] < 1e-9).sum()}/{len(files)} | {diff[:, j].max():.2g} | "
                     f"{np.nanmean([x[k] for x in a]):.4f} | {np.nanmean([y[k] for y in b]):.4f} |")
    lines += ["", "## Differences per file (only where some metric differs)", "",
              "| file | time signatures | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for f, p, x, y, d in zip(files, pieces, a, b, diff):
        if d.max() < 1e-9: continue
        ts = ', '.join(f"{n}/{dd}" for _, n, dd in p.time_signatures.tolist()[:4]) or 'none'
        cells = [f"{x[k]:.4f} vs {y[k]:.4f}" if dk >= 1e-9 else "=" for k, dk in zip(keys, d)]
        lines.append(f"| {f.stem} | {ts} | " + " | ".join(cells) + " |")
    lines += ["", "Known causes of the differences: MusPy measures a piece's length to its last event of any kind "
              "(controller and pedal events included), MeloFormer to its last note end, which changes the beat count of "
              "`empty_beat_rate` where a pedal is released after the last note; MusPy's groove assumes one time signature "
              "for the whole piece, MeloFormer's follows the tokenizer's bar grid through meter changes; on a coarser grid "
              "(`groove_24`) MusPy's `adjust_resolution` rounds with Python's `round` (half to even), MeloFormer half up as the "
              "tokenizer does, so onsets exactly halfway between two steps land one step apart (30 of 6,760 in Aicha) and "
              "the last note end (hence the bar count) can move too.", "",
              "## Time (all files, all metrics above)", "",
              "| implementation | total ms | speed vs MusPy |", "|---|---:|---:|",
              f"| meloformer.evaluate | {1000 * t_ours:.1f} | {t_muspy / t_ours:.1f}x |",
              f"| MusPy | {1000 * t_muspy:.1f} | 1.0x |"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
