"""Tokenizer throughput: MeloFormer's HID tokenizer (symusic and miditoolkit readers) against MidiTok's REMI.

Encodes and decodes every readable file of the real test MIDI (`shared/midi`) with each tokenizer in the
same run, several repeats, median of the repeats; prints a markdown table with the ratios to REMI and where
the encode time goes (parsing vs tokenizing), and writes it to bench/results/tokenizer.md.

    python bench/tokenizer.py [--midi DIR] [--repeats 5]

Needs the `bench` extra (miditok).
"""
import argparse
from pathlib import Path

import symusic

from meloformer.tokenizer import HIDTokenizer, MidiReadError, read_piece, sample_midi_dir, layout_piece, _write_tokens
from _common import machine, median_time






def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--midi', default=None, help="folder of MIDI files (default: shared/midi)")
    ap.add_argument('--repeats', type=int, default=5, help="timed repeats per measurement (median reported)")
    ap.add_argument('--out', default=str(Path(__file__).parent/'results'/'tokenizer.md'))
    args = ap.parse_args()
    from miditok import REMI, TokenizerConfig as RemiConfig

    root = Path(args.midi) if args.midi else sample_midi_dir()
    if root is None: raise SystemExit("no MIDI folder: pass --midi DIR")
    tok = HIDTokenizer()
    files = []
    # the real pieces (multitrack/, one_track/ where the folder has them), not the tiny timing cases of edge/
    candidates = sorted(root.glob('multitrack/*.mid')) + sorted(root.glob('one_track/*.mid')) or sorted(root.rglob('*.mid'))
    for f in candidates:
        try: tok.encode(f); files.append(f)
        except MidiReadError: pass
    # REMI with what HID keeps too: programs in one stream, tempos, time signatures
    remi = REMI(RemiConfig(use_programs=True, one_token_stream_for_programs=True, use_tempos=True,
                           use_time_signatures=True, use_chords=False))
    n_notes = sum(sum(len(t.notes) for t in symusic.Score(str(f)).tracks) for f in files)
    datas = [f.read_bytes() for f in files]

    hid_ids = [tok.encode(f) for f in files]
    remi_seqs = [remi.encode(str(f)) for f in files]
    n_hid = sum(len(x) for x in hid_ids)
    n_remi = sum(len(s.ids) for s in remi_seqs)
    pieces = [read_piece(d) for d in datas]

    t = {}
    t['HID encode (symusic)'] = median_time(lambda: [tok.encode(f) for f in files], args.repeats)
    t['HID encode (miditoolkit)'] = median_time(lambda: [tok.encode(f, reader='miditoolkit') for f in files], max(1, args.repeats // 2))
    t['REMI encode'] = median_time(lambda: [remi.encode(str(f)) for f in files], args.repeats)
    t['HID decode'] = median_time(lambda: [tok.decode(x) for x in hid_ids], args.repeats)
    t['REMI decode'] = median_time(lambda: [remi.decode(s) for s in remi_seqs], args.repeats)
    # where the encode time goes
    parse_sym = median_time(lambda: [symusic.Score(str(f)) for f in files], args.repeats)
    parse_read = median_time(lambda: [read_piece(f) for f in files], args.repeats)
    hid_tokenize = median_time(lambda: [_write_tokens(tok.config, tok.vocab_index, tok.ranges, layout_piece(tok.config, p)) for p in pieces], args.repeats)
    scores = [symusic.Score(str(f)) for f in files]
    remi_tokenize = median_time(lambda: [remi.encode(s) for s in scores], args.repeats)

    rows = []
    for name, secs in t.items():
        is_remi = name.startswith('REMI')
        tokens = n_remi if is_remi else n_hid
        anchor = t['REMI encode'] if 'encode' in name else t['REMI decode']
        rows.append(f"| {name} | {len(files) / secs:,.0f} | {n_notes / secs:,.0f} | {tokens / secs:,.0f} | "
                    f"{secs * 1e3:.1f} | {anchor / secs:.2f}x |")
    lines = [f"# Tokenizer throughput", "",
             f"{machine()}; {len(files)} files of {root.parent.name}/{root.name}, {n_notes:,} notes; "
             f"HID {n_hid:,} tokens, REMI {n_remi:,} tokens; median of {args.repeats} repeats after a warm-up.", "",
             "| path | files/s | notes/s | tokens/s | total ms | speed vs REMI |", "|---|---:|---:|---:|---:|---:|", *rows, "",
             "Where encode time goes (all files, ms):", "",
             "| step | HID | REMI |", "|---|---:|---:|",
             f"| parse with symusic (`Score(path)`) | {parse_sym * 1e3:.1f} (read_piece: {parse_read * 1e3:.1f}) | {parse_sym * 1e3:.1f} |",
             f"| tokenize a parsed piece | {hid_tokenize * 1e3:.1f} | {remi_tokenize * 1e3:.1f} |",
             f"| end to end | {t['HID encode (symusic)'] * 1e3:.1f} | {t['REMI encode'] * 1e3:.1f} |", ""]
    text = '\n'.join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
