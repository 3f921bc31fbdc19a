"""Score trained infill runs on the held-out spans of bench/infill.py: infill mode against continuation mode, by span
(bars x tracks) and by group (one track, whole track, all tracks), and each run's last validation loss. For runs
trained apart from bench/infill.py (another seed, more steps), with the same spans and `span_nll`.

    python bench/infill_runs.py RUN [RUN ...] [--out FILE]      # RUN: a training run folder (RUN/model, RUN/metrics.csv)
"""
import argparse, json, sys, types
from pathlib import Path

import pandas as pd

from meloformer.data import demo_dataset
from meloformer.evaluate import span_nll
from meloformer.model import load_pretrained
from infill import draw_spans, md_table
from _common import machine

GROUP = {'one': 'one track, 1-4 bars', 'all': 'all tracks, 1-4 bars'}


def score(run: Path, spans=None) -> tuple[pd.DataFrame, list]:
    "Per span: bars, tracks, group, tokens, NLL sums in both modes; and the spans (drawn once, then passed back in)."
    model, tok = load_pretrained(run / 'model')
    spans = spans or draw_spans(tok, demo_dataset('valid'), types.SimpleNamespace(seed=0, pieces=15, max_seq_len=512))
    rows = []
    for s in spans:
        r = dict(bars=str(s['bars']), tracks=s['tracks'], group='whole track' if s['bars'] == 'whole track' else GROUP[s['tracks']])
        for mode in ('infill', 'continuation'): r[mode], r['tokens'] = span_nll(model, tok, s['ids'], s['segments'], mode)
        rows.append(r)
    return pd.DataFrame(rows), spans


def summary(df: pd.DataFrame, by: list) -> pd.DataFrame:
    g = df.groupby(by, sort=False) if by else df.groupby(lambda _: 'all 95 spans' if len(df) == 95 else 'all spans', sort=False)
    t = pd.DataFrame({'spans': g.size(), 'tokens': g.tokens.sum(), 'infill mode': g.infill.sum() / g.tokens.sum(),
                      'continuation mode': g.continuation.sum() / g.tokens.sum()})
    t['infill - continuation'] = t['infill mode'] - t['continuation mode']
    t['spans lower'] = g.apply(lambda d: int((d.infill < d.continuation).sum()))
    return t.round(3).rename_axis(by or ['spans scored']).reset_index()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help='training run folders')
    p.add_argument('--out', default=None, help='also write the tables to this markdown file')
    a = p.parse_args(argv)
    lines, spans = [f"{machine()}. Command: `python bench/infill_runs.py {' '.join(a.runs)}`.", ''], None
    for run in map(Path, a.runs):
        if not (run / 'model' / 'config.json').is_file(): sys.exit(f"{run}: no trained model (RUN/model/config.json)")
        df, spans = score(run, spans)
        m = pd.read_csv(run / 'metrics.csv').dropna(subset=['val_loss']).iloc[-1]
        cfg, st = json.loads((run / 'model' / 'config.json').read_text()), json.loads((run / 'run.json').read_text())['settings']
        lines += [f"## {run}", '', f"`--infill_rate {cfg.get('infill_rate', 0)}`, `--rope {cfg.get('rope', 'seq')}`, `--seed {st.get('seed')}`, "
                  f"`{st.get('model_size')}`, rows of {st.get('max_seq_len')} tokens, batch {st.get('batch_size')}; validation loss "
                  f"{m.val_loss:.3f} at step {int(m.step)}, its last.", '',
                  md_table(summary(df, [])), '', md_table(summary(df, ['group'])), '', md_table(summary(df, ['bars', 'tracks'])), '']
        print('\n'.join(lines[-9:]), flush=True)
    if a.out: Path(a.out).write_text('# Infilling: trained runs scored on the held-out spans\n\n' + '\n'.join(lines)); print(f"written to {a.out}")


if __name__ == '__main__':
    main()
