"""The comparison's pictures (PNG): loss curves, loss by context length, cache
bytes versus context, decode time versus context; one line per family (and per
extra seed in the first two: the family's colour, dashed)."""
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(path: str, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], *,
          logx: bool = False, logy: bool = False, groups: dict[str, str] | None = None) -> None:
  """One line per series; `groups` (series -> family) draws a family's later series in its first one's
  colour, dashed."""
  figure, axes = plt.subplots(figsize=(7, 4.5))
  colors = plt.get_cmap('tab20').colors  # 20 distinct colours: no two families share one
  groups = groups or {name: name for name in series}
  order = list(dict.fromkeys(groups[name] for name in series))
  seen = set()
  for name, (xs, ys) in series.items():
    i = order.index(groups[name])
    axes.plot(xs, ys, marker='o' if len(xs) < 30 else None, markersize=3, label=name,
              color=colors[2 * i % 20 + i // 10], linestyle='--' if groups[name] in seen else '-')
    seen.add(groups[name])
  axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logx:
    axes.set_xscale('log', base=2)
  if logy:
    axes.set_yscale('log')
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def buckets_inside_rows(longest_context: dict) -> list[dict]:
  """Loss-by-position buckets that start inside the rows (the one past them holds only each row's last target)."""
  buckets = longest_context['loss_by_position']
  return [b for b in buckets if b['first'] < longest_context['seq_len']] or buckets


def write_all(results: list[dict], workdir: str) -> list[str]:
  """Writes the four plots into workdir; returns their paths. A result's `run` (default: its `name`) labels
  its line; the cache and decode plots draw the results with decode measurements (a family's first seed)."""
  paths = [os.path.join(workdir, f'compare_{n}.png') for n in ('loss', 'loss_by_context', 'cache', 'decode')]
  label = lambda r: r.get('run', r['name'])
  groups = {label(r): r['name'] for r in results}
  measured = [r for r in results if r.get('decode')]
  line_plot(paths[0], 'Training loss', 'step', 'loss (nats/token)',
        {label(r): tuple(zip(*r['curve'])) for r in results}, groups=groups)
  line_plot(paths[1], 'Held-out loss by context length (longest evaluation rows)', 'tokens of context',
        'loss (nats/token)', {label(r): ([b['first'] for b in buckets_inside_rows(r['longest_context'])],
                                         [b['loss'] for b in buckets_inside_rows(r['longest_context'])])
                              for r in results}, logx=True, groups=groups)
  line_plot(paths[2], 'Decode cache (bf16, batch 1)', 'context length', 'bytes',
        {r['name']: ([int(c) for c in r['cache_bytes']], list(r['cache_bytes'].values())) for r in measured},
        logx=True, logy=True)
  line_plot(paths[3], 'Per-token decode time', 'context length', 'seconds per token',
        {r['name']: ([d['context'] for d in r['decode']], [d['decode_s_per_token'] for d in r['decode']])
         for r in measured}, logx=True)
  return paths
