"""The comparison's pictures (PNG): loss curves, loss by context length, cache
bytes versus context, decode time versus context; one line per family."""
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(path: str, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], *,
          logx: bool = False, logy: bool = False) -> None:
  figure, axes = plt.subplots(figsize=(7, 4.5))
  colors = plt.get_cmap('tab20').colors  # 20 distinct colours: no two families share one
  for i, (name, (xs, ys)) in enumerate(series.items()):
    axes.plot(xs, ys, marker='o' if len(xs) < 30 else None, markersize=3, label=name, color=colors[2 * i % 20 + i // 10])
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


def write_all(results: list[dict], workdir: str) -> list[str]:
  """Writes the four plots into workdir; returns their paths."""
  paths = [os.path.join(workdir, f'compare_{n}.png') for n in ('loss', 'loss_by_context', 'cache', 'decode')]
  line_plot(paths[0], 'Training loss', 'step', 'loss (nats/token)',
        {r['name']: tuple(zip(*r['curve'])) for r in results})
  line_plot(paths[1], 'Held-out loss by context length (longest evaluation rows)', 'tokens of context',
        'loss (nats/token)', {r['name']: ([b['first'] for b in r['longest_context']['loss_by_position']],
                                          [b['loss'] for b in r['longest_context']['loss_by_position']])
                              for r in results}, logx=True)
  line_plot(paths[2], 'Decode cache (bf16, batch 1)', 'context length', 'bytes',
        {r['name']: ([int(c) for c in r['cache_bytes']], list(r['cache_bytes'].values())) for r in results},
        logx=True, logy=True)
  line_plot(paths[3], 'Per-token decode time', 'context length', 'seconds per token',
        {r['name']: ([d['context'] for d in r['decode']], [d['decode_s_per_token'] for d in r['decode']])
         for r in results}, logx=True)
  return paths
