#!/usr/bin/env python
"""Build the demo corpus that ships inside the package.

Renders the J.S. Bach chorales bundled with music21's corpus to standard MIDI
files, one file per chorale, with one track per voice part:

    Soprano -> GM program 40 (violin)
    Alto    -> GM program 40 (violin)
    Tenor   -> GM program 41 (viola)
    Bass    -> GM program 42 (cello)

Tracks are always written in S, A, T, B order. Each file gets a tempo chosen
deterministically from 72-100 BPM (seeded by the chorale's BWV name), the
chorale's time signature(s) and a resolution of 480 ticks per quarter note.

The MIDI is written with miditoolkit straight from music21's note data, which
keeps full control over the result: ties are merged into single notes, rests
and zero-length grace notes are dropped, and a pickup (anacrusis) bar is padded
with a leading rest so that bar lines fall where the time signature says.

Usage:
    python tools/build_demo_corpus.py                 # all chorales
    python tools/build_demo_corpus.py --n 20 --out /tmp/demo

After writing, every file is read back with miditoolkit and symusic and a
summary is printed. A SOURCES.md describing the corpus is written next to the
MIDI files.
"""

import argparse
import sys
import zlib
from collections import Counter
from fractions import Fraction
from pathlib import Path

import miditoolkit
import music21
import symusic
from music21 import corpus, meter
from tqdm import tqdm

TICKS_PER_QUARTER = 480
VELOCITY = 80
TEMPO_RANGE = (72, 100)  # inclusive, BPM

# Voice parts in output order: (track name, GM program).
VOICES = [("Soprano", 40), ("Alto", 40), ("Tenor", 41), ("Bass", 42)]

# The corpus also holds Humdrum (.krn) versions of a few chorales whose
# encodings carry a "rights to derivative formats reserved" notice, so only the
# MusicXML encodings are used.
SOURCE_EXTENSIONS = ("mxl",)


class Skip(Exception):
    """A chorale that cannot (or should not) be rendered; the message says why."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Render the Bach chorales from music21's corpus to 4-track MIDI files "
        "(Soprano/Alto: violin, Tenor: viola, Bass: cello).")
    parser.add_argument("--out", type=Path, default=Path("meloformer/assets/demo"),
                        help="output folder (default: %(default)s)")
    parser.add_argument("--n", type=int, default=None,
                        help="stop after writing this many files (default: all available)")
    parser.add_argument("--no-sources", action="store_true",
                        help="do not write SOURCES.md into the output folder")
    return parser.parse_args(argv)


def chorale_names():
    """Corpus names such as 'bach/bwv269', in Riemenschneider order, without repeats.

    The Riemenschneider numbering lists some chorales twice; those are rendered once.
    """
    names = list(corpus.chorales.Iterator(returnType="filename"))
    unique = list(dict.fromkeys(names))
    return unique, len(names) - len(unique)


def tempo_for(stem):
    """A tempo in TEMPO_RANGE that depends only on the chorale's name (e.g. 'bwv269')."""
    lo, hi = TEMPO_RANGE
    return lo + zlib.crc32(stem.encode("utf-8")) % (hi - lo + 1)


def to_ticks(quarter_length):
    return int(round(float(quarter_length) * TICKS_PER_QUARTER))


def find_voice_parts(score):
    """Return the score's Soprano, Alto, Tenor and Bass parts, in that order.

    Parts are matched by name: an exact match ('Soprano') wins, otherwise a single
    part whose name starts with the voice ('Soprano Oboe 1 Violin1'). Other parts
    (instruments, continuo) are ignored. A score of exactly four unnamed parts is
    taken in order.
    """
    parts = list(score.parts)
    if len(parts) < 4:
        raise Skip(f"only {len(parts)} parts")
    labels = [(p.partName or "").strip().lower() for p in parts]
    if len(parts) == 4 and not any(labels):
        return parts

    found = []
    for voice, _ in VOICES:
        v = voice.lower()
        exact = [p for p, label in zip(parts, labels) if label == v]
        prefixed = [p for p, label in zip(parts, labels) if label.split(" ")[0] == v]
        candidates = exact if exact else prefixed
        if len(candidates) != 1:
            names = [p.partName for p in parts]
            raise Skip(f"cannot pick one {voice} part from {names}")
        found.append(candidates[0])
    return found


def pickup_padding(part):
    """Quarter lengths of rest needed before a pickup bar to make it a full bar."""
    measures = part.getElementsByClass("Measure")
    if not measures:
        return 0.0
    return float(measures[0].paddingLeft or 0.0)


def part_notes(part, shift_ticks):
    """miditoolkit notes of one part: ties merged, rests and grace notes dropped."""
    notes = {}
    for n in part.stripTies().flatten().notes:
        if n.duration.isGrace or n.duration.quarterLength <= 0:
            continue
        start = to_ticks(n.offset) + shift_ticks
        end = to_ticks(n.offset + n.duration.quarterLength) + shift_ticks
        if end <= start:
            continue
        for p in n.pitches:  # one pitch for a note, several for a chord
            if p.midi is None or not 0 <= p.midi <= 127:
                continue
            key = (p.midi, start)
            # two voices on one staff in unison: keep a single, longest note
            if key not in notes or notes[key].end < end:
                notes[key] = miditoolkit.Note(velocity=VELOCITY, pitch=p.midi, start=start, end=end)
    return sorted(notes.values(), key=lambda x: (x.start, x.pitch))


def bars(part):
    """The part's bars as (start, length, time signature), in quarter lengths.

    Starts count from the beginning of the pickup bar, which is padded to full length
    (see pickup_padding). A bar split in two short measures (at a repeat sign or a
    meter change, the second half being a pickup) is merged back into one bar when
    the two halves add up to a full bar of the first half's meter.
    """
    result, ts, shift = [], None, Fraction(pickup_padding(part))
    for i, m in enumerate(part.getElementsByClass("Measure")):
        if m.timeSignature is not None:
            ts = m.timeSignature
        if ts is None:
            ts = meter.TimeSignature("4/4")
        start = Fraction(m.offset) + shift
        length = Fraction(m.duration.quarterLength)
        if i == 0:
            start, length = Fraction(0), length + shift
        elif result and result[-1][1] + length == Fraction(result[-1][2].barDuration.quarterLength):
            # keep the earlier meter: a meter change on the pickup applies from the
            # next bar line on, where the following measure starts
            prev_start, prev_length, prev_ts = result.pop()
            result.append((prev_start, prev_length + length, prev_ts))
            continue
        result.append((start, length, ts))
    return result


def meter_for(length, ts):
    """(numerator, denominator) for a bar of `length` quarters, preferring ts's own."""
    if length == Fraction(ts.barDuration.quarterLength):
        return ts.numerator, ts.denominator
    for denominator in (ts.denominator, 4, 8, 16, 32):
        numerator = length * denominator / 4
        if numerator.denominator == 1:
            return int(numerator), denominator
    return ts.numerator, ts.denominator  # unreachable for score durations


def time_signatures(part):
    """miditoolkit time signatures that put a MIDI bar line at every bar line of the part.

    Beyond the score's own time signatures, an irregular bar (a short bar before a
    fermata, an odd-length bar in the encoding) gets a time signature of its own
    length, and the regular meter is restored after it. The final bar may be short
    without one: nothing follows it.
    """
    result = []
    all_bars = bars(part)
    for k, (start, length, ts) in enumerate(all_bars):
        if k == len(all_bars) - 1 and length < Fraction(ts.barDuration.quarterLength):
            length = Fraction(ts.barDuration.quarterLength)
        numerator, denominator = meter_for(length, ts)
        if result and (result[-1].numerator, result[-1].denominator) == (numerator, denominator):
            continue
        result.append(miditoolkit.TimeSignature(numerator, denominator, to_ticks(start)))
    return result


def render(name):
    """Parse one corpus chorale and return (stem, miditoolkit.MidiFile); raises Skip."""
    stem = name.split("/")[-1]
    try:
        score = corpus.parse(name, fileExtensions=SOURCE_EXTENSIONS)
    except Exception as e:  # any parse failure is reported and skipped
        raise Skip(f"music21 could not parse it: {type(e).__name__}: {e}") from e
    if score.metadata is not None and score.metadata.copyright:
        raise Skip(f"encoding carries a copyright notice: {score.metadata.copyright}")

    parts = find_voice_parts(score)
    shift = to_ticks(pickup_padding(parts[0]))

    midi = miditoolkit.MidiFile(ticks_per_beat=TICKS_PER_QUARTER)
    midi.tempo_changes = [miditoolkit.TempoChange(tempo_for(stem), 0)]
    midi.time_signature_changes = time_signatures(parts[0])
    for part, (voice, program) in zip(parts, VOICES):
        track = miditoolkit.Instrument(program=program, is_drum=False, name=voice)
        track.notes = part_notes(part, shift)
        if not track.notes:
            raise Skip(f"{voice} part has no notes")
        midi.instruments.append(track)
    midi.max_tick = max(n.end for t in midi.instruments for n in t.notes)
    return stem, midi


def unique_path(out_dir, stem, taken):
    """out_dir/<stem>.mid, with _2, _3, ... appended if that name was already used."""
    name, k = stem, 1
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return out_dir / f"{name}.mid"


def verify(paths):
    """Read every file back with miditoolkit and symusic; return a summary dict."""
    problems, total_notes, total_bytes = [], 0, 0
    time_sigs, tempos = Counter(), []
    for path in tqdm(paths, desc="verifying", unit="file"):
        total_bytes += path.stat().st_size
        try:
            mtk = miditoolkit.MidiFile(str(path))
            sym = symusic.Score(str(path))
        except Exception as e:
            problems.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
            continue
        mtk_counts = [len(t.notes) for t in mtk.instruments]
        sym_counts = [len(t.notes) for t in sym.tracks]
        if len(mtk_counts) != 4 or len(sym_counts) != 4:
            problems.append(f"{path.name}: {len(mtk_counts)} / {len(sym_counts)} tracks, expected 4")
        if 0 in mtk_counts or 0 in sym_counts:
            problems.append(f"{path.name}: a track without notes")
        if sum(mtk_counts) != sum(sym_counts):
            problems.append(f"{path.name}: miditoolkit reads {sum(mtk_counts)} notes, "
                            f"symusic {sum(sym_counts)}")
        total_notes += sum(mtk_counts)
        for ts in mtk.time_signature_changes:
            time_sigs[f"{ts.numerator}/{ts.denominator}"] += 1
        tempos.extend(round(t.tempo) for t in mtk.tempo_changes)
    return dict(files=len(paths), notes=total_notes, bytes=total_bytes,
                time_sigs=time_sigs, tempos=tempos, problems=problems)


def write_sources(out_dir, command, summary, skipped, repeats):
    ts = ", ".join(f"{k} ({v})" for k, v in sorted(summary["time_sigs"].items()))
    lines = [
        "# Demo corpus: J.S. Bach chorales",
        "",
        f"{summary['files']} four-part chorales by Johann Sebastian Bach (1685-1750), as",
        "standard MIDI files, one file per chorale, named after the chorale's BWV",
        "number as music21 spells it (`bwv269.mid`, `bwv153.1.mid`, ...).",
        "",
        "## Source and license",
        "",
        "- The compositions are in the public domain.",
        f"- The notes come from the MusicXML (`.mxl`) encodings of the chorales in the corpus",
        f"  bundled with [music21](https://github.com/cuthbertLab/music21) {music21.__version__}",
        "  (`music21.corpus.chorales.Iterator()`, Riemenschneider order). music21 itself is",
        "  BSD-3-Clause licensed; its corpus notes (`music21/corpus/license.txt`) that",
        "  encodings are distributed with the encoders' permission and that individual",
        "  pieces or directories may carry their own terms. The MusicXML files used here",
        "  carry no rights statement. The corpus also holds Humdrum (`.krn`) encodings of",
        "  a few chorales marked \"Copyright 1994, CCARH ... rights to all derivative",
        "  electronic formats reserved\"; those encodings are NOT used (the MusicXML",
        "  encoding of the same chorale is used instead), and any piece whose encoding",
        "  carries a copyright notice is skipped.",
        "",
        "## How the files were made",
        "",
        "```",
        command,
        "```",
        "",
        "- One track per voice, always in the order Soprano, Alto, Tenor, Bass:",
        "",
        "  | track | voice   | GM program      |",
        "  |-------|---------|-----------------|",
        "  | 0     | Soprano | 40 (violin)     |",
        "  | 1     | Alto    | 40 (violin)     |",
        "  | 2     | Tenor   | 41 (viola)      |",
        "  | 3     | Bass    | 42 (cello)      |",
        "",
        "  Instrumental and continuo parts present in some cantata chorales are left out.",
        f"- Resolution {TICKS_PER_QUARTER} ticks per quarter note; velocity {VELOCITY} throughout.",
        f"- One tempo per piece, {TEMPO_RANGE[0]}-{TEMPO_RANGE[1]} BPM, chosen deterministically",
        "  from the file name (CRC-32 of e.g. `bwv269`).",
        "- The chorale's time signature(s), placed so that every bar line of the score is",
        "  a MIDI bar line: a pickup (anacrusis) bar is padded with a leading rest, a bar",
        "  split in two at a repeat sign or meter change is joined back into one, and an",
        "  irregular bar (e.g. a short bar before a fermata) gets a time signature of its",
        "  own length (the `1/4`, `2/4`, `10/4` ... entries below), the meter resuming after it.",
        "- Tied notes are merged into single notes; rests and grace notes are dropped;",
        "  fermatas, repeats, dynamics and lyrics are not rendered.",
        "",
        "## Contents",
        "",
        f"- files: {summary['files']}",
        f"- notes: {summary['notes']}",
        f"- time signatures (number of time-signature events): {ts}",
    ]
    if repeats:
        lines.append(f"- {repeats} entries of the Riemenschneider list repeat an earlier chorale "
                     "and were rendered once.")
    if skipped:
        lines.append("- skipped:")
        lines += [f"  - `{name}`: {why}" for name, why in skipped]
    (out_dir / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    names, repeats = chorale_names()
    print(f"{len(names)} distinct chorales in music21's corpus "
          f"({repeats} repeated entries in the Riemenschneider list ignored)")

    written, skipped, taken = [], [], set()
    bar = tqdm(names, desc="rendering", unit="chorale")
    for name in bar:
        if args.n is not None and len(written) >= args.n:
            break
        try:
            stem, midi = render(name)
        except Skip as why:
            skipped.append((name, str(why)))
            continue
        path = unique_path(args.out, stem, taken)
        midi.dump(str(path))
        written.append(path)
    bar.close()

    stray = sorted(set(args.out.glob("*.mid")) - set(written))
    if stray:
        print(f"warning: {len(stray)} .mid files in {args.out} were not written by this run "
              f"(e.g. {stray[0].name})")

    summary = verify(written)
    if not args.no_sources:
        command = "python tools/build_demo_corpus.py " + " ".join(
            a if a.startswith("-") else str(a) for a in (argv if argv is not None else sys.argv[1:]))
        write_sources(args.out, command.strip(), summary, skipped, repeats)

    print(f"files:        {summary['files']}")
    print(f"total notes:  {summary['notes']}")
    print(f"total size:   {summary['bytes'] / 1024:.1f} KiB (MIDI files only)")
    print(f"time sigs:    " + ", ".join(f"{k} x{v}" for k, v in sorted(summary["time_sigs"].items())))
    if summary["tempos"]:
        print(f"tempo range:  {min(summary['tempos'])}-{max(summary['tempos'])} BPM")
    print(f"skipped:      {len(skipped)}")
    for name, why in skipped:
        print(f"  {name}: {why}")
    if summary["problems"]:
        print(f"{len(summary['problems'])} verification problems:")
        for p in summary["problems"]:
            print(f"  {p}")
        return 1
    print("all files read back with miditoolkit and symusic: 4 tracks, notes in every track")
    return 0


if __name__ == "__main__":
    sys.exit(main())
