"""Plots of training runs, and how every figure of the experiments is written (matplotlib stays out
of the library)."""

from __future__ import annotations

import pathlib

from rwkv_jax import files
from rwkv_jax.train import metrics


def plot_loss(workdir: str | pathlib.Path, title: str = "", path: str | pathlib.Path | None = None
              ) -> pathlib.Path:
  """Draws train and validation bits per token from WORKDIR/metrics.jsonl.

  Args:
    workdir: a training run's directory.
    title: the figure's title (e.g. the model's shape).
    path: the PNG to write; default WORKDIR/loss.png.

  Returns:
    The PNG's path.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = metrics.read_history(workdir)
  train = [(r["step"], r["train/bits_per_token"]) for r in records if "train/bits_per_token" in r]
  val = [(r["step"], r["val/bits_per_token"]) for r in records if "val/bits_per_token" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train")
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("bits per token")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  return save_figure(fig, pathlib.Path(path) if path else pathlib.Path(workdir) / "loss.png")


def save_figure(fig, path: str | pathlib.Path, dpi: int = 110) -> pathlib.Path:
  """Lays `fig` out, writes it to `path` as PNG atomically and closes it; returns the path."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig.tight_layout()
  with files.atomic_write(path) as f:
    fig.savefig(f, dpi=dpi, format="png")
  plt.close(fig)
  return pathlib.Path(path)


def model_title(config) -> str:
  """A figure title naming the model of an experiment config."""
  m = config.model
  return f"{m.n_layer} layers x {m.n_embd}, ctx {m.ctx_len}"
