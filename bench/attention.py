"""Summary-token attention on real multitrack pieces: pair vs block density, and flex vs sdpa forward time.

    python bench/attention.py [--quick]

Prints markdown tables and writes them to bench/results/attention.md (machine and date in the header),
plus bench/results/attention_masks.png (the stage-2 masks of a real piece per preset).

The pieces are the multitrack songs of `shared/midi` beside the repository (or `$MELOFORMER_MIDI`); without
it, the files `write_sample_midi` makes from the demo chorales (`band.mid`, 8 tracks, and `long.mid`, 34,513 tokens).
"""
import argparse, os, tempfile
from pathlib import Path
import numpy as np
import torch
from meloformer.attention import MaskConfig, build_masks, attend, mask_stats, plot_masks
from meloformer.data import pack_pieces, pad_rows
from meloformer.tokenizer import TokenKind
from meloformer.tokenizer import HIDTokenizer, TokenizerConfig, sample_midi_dir, write_sample_midi
from _common import machine, median_time

OUT = Path(__file__).resolve().parent / 'results'
PAIR = ('In Too Deep', 'Les Yeux Revolvers')           # the packed row's pieces in shared/midi


def midi_files() -> tuple[list[Path], str]:
    "The multitrack pieces: shared/midi's songs where present, else band.mid and long.mid written to a temp folder."
    shared = sample_midi_dir()
    files = sorted((shared / 'multitrack').glob('*.mid')) if shared else []
    if files: return files, '`shared/midi/multitrack`'
    written = write_sample_midi(Path(tempfile.mkdtemp(prefix='meloformer-bench-')))
    return written['multitrack'] + written['long'], '`write_sample_midi` (no shared/midi here): `band.mid` and `long.mid`'



def md_table(rows: list[dict], floatfmt='{:.3f}') -> str:
    cols = list(rows[0])
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else str(v)
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    return '\n'.join(lines + ['| ' + ' | '.join(fmt(r[c]) for c in cols) + ' |' for r in rows])


def to_batch(meta: dict, L: int) -> dict:
    "One piece's (or packed row's) metadata as a batch of one, its first L tokens (never padded)."
    return pad_rows([meta], min(L, len(meta['seg'])))


def density_rows(inputs: dict, configs: dict) -> list[dict]:
    rows = []
    for (L, name), metas in inputs.items():
        for cname, cfg in configs.items():
            sts = [mask_stats(m, cfg, block_sizes=(128, 64)) for m in metas]
            mean = {k: float(np.mean([s[k] for s in sts])) for k in sts[0] if k != 'L'}
            rows.append(dict(L=L, input=name, mask=cname, pairs=mean['pair_frac'], rr_pairs=mean['rr_pair_frac'],
                             blocks128=mean['block_frac_128'], blocks64=mean['block_frac_64'],
                             gap128=mean['block_frac_128'] / mean['pair_frac'], gap64=mean['block_frac_64'] / mean['pair_frac']))
            print(md_table([rows[-1]]).splitlines()[-1], flush=True)
    return rows


def timing_rows(inputs: dict, n_head=4, head_dim=64, repeats=5) -> list[dict]:
    "Stage-2 (update) attention forward: compiled flex vs sdpa with the dense mask vs dense causal sdpa."
    rows = []
    torch.manual_seed(0)
    for (L, name), meta in inputs.items():
        masks_f, masks_s = build_masks(meta, MaskConfig(), 'flex'), build_masks(meta, MaskConfig(), 'sdpa')
        Lk = masks_f.meta.L + masks_f.meta.S
        q = torch.randn(1, n_head, L, head_dim); kv = torch.randn(1, n_head, Lk, head_dim)
        with torch.no_grad():
            t_flex = median_time(lambda: attend(q, kv, kv, masks_f.update), repeats)
            t_sdpa = median_time(lambda: attend(q, kv, kv, masks_s.update), repeats)
            t_causal = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv[:, :, :L], kv[:, :, :L], is_causal=True), repeats)
        rows.append(dict(L=L, input=name, heads=n_head, head_dim=head_dim, flex_s=t_flex, sdpa_masked_s=t_sdpa,
                         sdpa_causal_s=t_causal, masked_over_flex=t_sdpa / t_flex, causal_over_flex=t_causal / t_flex))
        print(md_table([rows[-1]]).splitlines()[-1], flush=True)
    return rows


def mask_picture(path: Path, midi: Path):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tok = HIDTokenizer(TokenizerConfig(max_bars=8))
    fig = plot_masks(pad_rows([tok.annotate(tok.encode(midi))]), dpi=60,
                     title=f'{midi.stem}, first 8 bars of every track: stage-2 masks (summaries right of red)')
    fig.savefig(path, dpi=60); plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='fewer pieces and configs (a smoke run)')
    ap.add_argument('--repeats', type=int, default=5, help='timed repeats after one warm-up (median reported)')
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    OUT.mkdir(parents=True, exist_ok=True)
    tok = HIDTokenizer()
    files, source = midi_files()
    paths = {p.stem: p for p in files}
    pieces = {k: tok.annotate(tok.encode(p)) for k, p in paths.items()}
    lengths = {k: len(v['seg']) for k, v in pieces.items()}
    by_length = sorted(pieces, key=lambda k: -lengths[k])
    longest = by_length[0]                                # Aicha in shared/midi; long.mid without it
    assert lengths[longest] >= 24576, f'no piece of 24576 tokens among {lengths}'
    names8 = [k for k in by_length if lengths[k] >= 8192][:2 if args.quick else 4]
    n8 = len(names8)
    pair = list(PAIR) if all(k in pieces for k in PAIR) else by_length[1:3] if len(by_length) > 2 else by_length[::-1]
    packed = f'packed: {pair[0]} + {pair[1]}'
    inputs = {(8192, f'prefix of {n8} pieces (mean)'): [to_batch(pieces[k], 8192) for k in names8],
              (24576, f'{longest} prefix'): [to_batch(pieces[longest], 24576)]}
    if not args.quick:
        inputs[(24576, packed)] = [to_batch(pack_pieces([pieces[k] for k in pair]), 24576)]

    base = MaskConfig()
    configs = {'museformer': base, 'meloformer': MaskConfig.from_preset('meloformer'), 'dense causal': MaskConfig.from_preset('dense')}
    experiments = {
        'museformer': base,
        'cross bars (0,) only': MaskConfig(cross_offsets=(0,)),
        'cross via summaries only': MaskConfig(cross_offsets=()),
        'fine (1,2,4,8)': MaskConfig(fine_offsets=(1, 2, 4, 8)),
        'fine (1,2,4,8) + cross (0,)': MaskConfig(fine_offsets=(1, 2, 4, 8), cross_offsets=(0,)),
        'fine (1,2,4,8), cross via summaries': MaskConfig(fine_offsets=(1, 2, 4, 8), cross_offsets=()),
        'cross kinds onset/pitch/bar': MaskConfig(cross_kinds=(TokenKind.ONSET, TokenKind.PITCH, TokenKind.BAR)),
    }
    if args.quick: experiments = dict(list(experiments.items())[:3])

    print(f'# Summary-token attention benchmark\n\n{machine()}\n')
    print('## Density (fractions of dense causal attention)')
    dens = density_rows(inputs, configs)
    print('## Experiments: what narrows the gap between pair and block density')
    exp_inputs = {k: v for k, v in inputs.items() if k[1] != packed}
    exps = density_rows(exp_inputs, {k: v for k, v in experiments.items() if k != 'museformer'})
    print('## Forward time on this machine')
    timing = timing_rows({(8192, f'{names8[0]} prefix'): inputs[(8192, f'prefix of {n8} pieces (mean)')][0],
                          (24576, f'{longest} prefix'): inputs[(24576, f'{longest} prefix')][0]}, repeats=args.repeats)
    mask_picture(OUT / 'attention_masks.png', paths.get('Girls Just Want to Have Fun', files[0]))   # files[0]: band.mid without shared/midi

    report = f"""# Summary-token attention benchmark

Machine: {machine()}

Real pieces from {source}, tokenized with `HIDTokenizer()` (instrument-major). L = 8192:
the first 8192 tokens of the {n8} longest pieces ({', '.join(names8)}; token counts
{', '.join(str(lengths[k]) for k in names8)}), mean over them. L = 24576: only *{longest}* ({lengths[longest]} tokens)
is that long, so its prefix is used; a second row packs {pair[0]} and {pair[1]} into one row (pieces never
attend to each other), as the data module's packing does.

`pairs`: attended query-key pairs of both stages (update RR+RS and summarize SS+SR) over the L(L+1)/2 pairs
of dense causal attention; `rr_pairs`: the regular-to-regular part alone. `blocks128/64`: blocks of that
size a block-sparse kernel visits (both stages) over the n(n+1)/2 causal blocks. `gap` = blocks / pairs.

## Density

{md_table(dens)}

## What narrows the gap between pair and block density

Each row changes one thing against `museformer` (table above). Bars that are not read in full are still
read through their summaries.

{md_table(exps)}

Not measured: the order of tokens inside a bar (fixed by the tokenizer's contract, not by the masks).

## Forward time of the stage-2 attention on this machine (B = 1, fp32, median of {args.repeats} after a warm-up)

`flex`: compiled FlexAttention with the `museformer` block mask (block 128); `sdpa_masked`: the same mask as
a dense boolean; `sdpa_causal`: dense causal attention over the regular tokens (the anchor).

{md_table(timing)}

Mask picture: `attention_masks.png`.
"""
    (OUT / 'attention.md').write_text(report)
    print(f'\nwrote {OUT / "attention.md"}')


if __name__ == '__main__':
    main()
