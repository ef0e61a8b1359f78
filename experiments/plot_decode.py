"""Draws decode throughput against context from `benchmark --mode=decode` outputs (one line per file).

  python -m experiments.plot_decode --inputs=griffin.json,transformer.json --output=decode_throughput.png

Each line is one output file, labelled by its name: decode tokens/s at each context, at the largest
batch measured there (the row `--max_batch` found, else the biggest batch run): the Griffin paper's
throughput-versus-context curve when every file was run with --max_batch.
"""
import json
import os

from absl import flags

from experiments import flag_parsing
from experiments.compare_plots import line_plot

_INPUTS = flags.DEFINE_list('inputs', None, 'benchmark --mode=decode JSON outputs.', required=True)
_OUTPUT = flags.DEFINE_string('output', 'decode_throughput.png', 'The PNG to write.')


def throughput_by_context(result: dict) -> tuple[list[int], list[float]]:
  """(contexts, decode tokens/s) at the largest batch measured at each context."""
  best: dict[int, dict] = {}
  for row in result['results']:
    if not row.get('decode_tokens_per_s'):
      continue
    rank = lambda r: (bool(r.get('largest_batch')), r['batch'])
    if row['context'] not in best or rank(row) > rank(best[row['context']]):
      best[row['context']] = row
  contexts = sorted(best)
  return contexts, [best[c]['decode_tokens_per_s'] for c in contexts]


def main():
  series = {}
  for path in _INPUTS.value:
    with open(path) as f:
      series[os.path.splitext(os.path.basename(path))[0]] = throughput_by_context(json.load(f))
  line_plot(_OUTPUT.value, 'Decode throughput (largest batch measured at each context)', 'context (tokens)',
            'decode tokens/s', series, logx=True, logy=True)


if __name__ == '__main__':
  flag_parsing.run(main)
