"""Figures of `flaxtag.explain` (matplotlib, Agg canvas; no pyplot, so no global state or display needed).

Every axis over time shares one x-axis in seconds from the start of the file, and every row has its colour bar in
a column of its own, so the strips and maps lie exactly under the spectrogram frames they belong to.
"""
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
ATTENTION_SIZE = (12.0, 6.0)  # inches; 1200 × 600 pixels
CONTRIBUTION_SIZE = (12.0, 7.0)


def resatt_size(num_coarse: int, num_fine: int) -> tuple[float, float]:
  """Inches of the ResAtt figure: room for a tag name per row and column, within 6–24 × 3–16 inches."""
  return min(max(6.0, 3.0 + 0.25 * num_fine), 24.0), min(max(3.0, 2.5 + 0.3 * num_coarse), 16.0)


def _figure(size) -> Figure:
  figure = Figure(figsize=size, dpi=DPI, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def _extent(centres: np.ndarray) -> tuple[float, float]:
  """Edges of cells centred on evenly spaced `centres`."""
  step = centres[1] - centres[0] if len(centres) > 1 else 1.0
  return float(centres[0] - step / 2), float(centres[-1] + step / 2)


def _title(e, title: str) -> str:
  span = f"{e.offset_seconds:.2f}–{e.offset_seconds + e.crop_seconds:.2f} s"
  return f"{title}  ({span})" if title else span


def _spectrogram(figure, grid, row, e, sharex=None):
  ax = figure.add_subplot(grid[row, 0], sharex=sharex)
  image = ax.imshow(e.spectrogram, origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
                    extent=(*_extent(e.frame_seconds), -0.5, e.spectrogram.shape[0] - 0.5))
  ax.set_ylabel("mel band")
  ax.tick_params(labelbottom=False)
  figure.colorbar(image, cax=figure.add_subplot(grid[row, 1]), label="dB")
  return ax


def _strip(figure, grid, row, values, e, sharex, label):
  ax = figure.add_subplot(grid[row, 0], sharex=sharex)
  image = ax.imshow(values[None, :], aspect="auto", interpolation="nearest", cmap="viridis",
                    extent=(*_extent(e.token_seconds), 0.0, 1.0))
  ax.set_yticks([])
  ax.set_title(label, fontsize=9, loc="left")
  figure.colorbar(image, cax=figure.add_subplot(grid[row, 1]))
  return ax


def attention_figure(e, title: str = "") -> Figure:
  """The spectrogram with the last layer's [CLS] strip and the first layer's received-attention strip under it."""
  figure = _figure(ATTENTION_SIZE)
  grid = figure.add_gridspec(3, 2, height_ratios=(4, 1, 1), width_ratios=(60, 1))
  spec = _spectrogram(figure, grid, 0, e)
  spec.set_title(_title(e, title))
  last = _strip(figure, grid, 1, e.last_layer_cls, e, spec,
                f"last layer: attention of the [CLS] query to each token, summed over heads "
                f"([CLS] to itself: {e.last_layer_cls_self:.3f}, not shown)")
  last.tick_params(labelbottom=False)
  first = _strip(figure, grid, 2, e.first_layer_received, e, spec,
                 "first layer: attention each token receives, summed over queries and heads")
  first.set_xlabel("time (s)")
  return figure


def contribution_figure(e, title: str = "") -> Figure:
  """The spectrogram over the chosen tags' probabilities with the last layer's attention forced on each token.

  Each tag's row is scaled to its own range (given beside its name): forcing moves probabilities by different
  amounts for different tags, and one shared scale would show only the tags' overall levels.
  """
  figure = _figure(CONTRIBUTION_SIZE)
  grid = figure.add_gridspec(2, 2, height_ratios=(3, 2), width_ratios=(60, 1))
  spec = _spectrogram(figure, grid, 0, e)
  spec.set_title(_title(e, title))
  values = e.chosen_contribution().T[::-1]  # (tags, T), first tag on top
  low, high = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
  scaled = (values - low) / np.maximum(high - low, 1e-12)
  labels = [f"{name}\n{lo:.3f}–{hi:.3f}" for name, lo, hi in zip(e.chosen_tags[::-1], low[:, 0], high[:, 0])]
  ax = figure.add_subplot(grid[1, 0], sharex=spec)
  image = ax.imshow(scaled, origin="lower", aspect="auto", interpolation="nearest", cmap="viridis",
                    extent=(*_extent(e.token_seconds), -0.5, len(labels) - 0.5), vmin=0.0, vmax=1.0)
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  ax.set_title("tag probability with the last layer's attention forced onto one token (each tag from its minimum "
               "to its maximum)", fontsize=9, loc="left")
  ax.set_xlabel("time (s)")
  figure.colorbar(image, cax=figure.add_subplot(grid[1, 1]), label="within-tag scale")
  return figure


def resatt_figure(e, title: str = "") -> Figure:
  """The ResAtt head's coarse × fine attention map, tag names on the axes."""
  coarse, fine = e.coarse_tag_names, e.tag_names
  figure = _figure(resatt_size(len(coarse), len(fine)))
  ax = figure.add_subplot()
  image = ax.imshow(e.resatt_attention, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0.0)
  ax.set_xticks(range(len(fine)), fine, rotation=90)
  ax.set_yticks(range(len(coarse)), coarse)
  ax.set_xlabel("fine tag")
  ax.set_ylabel("coarse tag")
  ax.set_title(f"ResAtt attention map{': ' + title if title else ''}")
  figure.colorbar(image, ax=ax, label="attention")
  return figure
