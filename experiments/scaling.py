r"""Scaling (the paper's Section 5, Figure 4): RWKV's loss against training compute, a power law.

Several RWKV sizes train on the same byte stream with the same recipe, each for a budget set by
one rule: tokens = --tokens_per_param x parameters, so compute C = 6 N D grows as N^2 and every
point spends the same number of tokens per parameter (the compute-optimal frontier's shape, at a
fixed ratio rather than a searched one). Each point is (the model's matrix-product training
FLOPs, its final held-out loss); a line through log10 loss against log10 C (numpy.polyfit) gives
the exponent, and its r^2 is set beside the paper's 0.994.

  python -m experiments.scaling                 # 6 sizes L1 D32 .. L4 D96, Wikipedia sample, CPU
  python -m experiments.scaling --size=gpu      # 6 sizes L2 D128 .. L8 D512 on enwik8

Every run trains in --workdir/scaling_<size>/<model>; a re-run skips finished runs and resumes an
unfinished one from its checkpoints. Writes experiments/results/scaling_<tag>.json and .png.
"""

from __future__ import annotations

import logging
import math
import pathlib
from typing import Sequence

import numpy as np
from absl import flags

from experiments import _runs, benchlib, plots
from experiments.configs import char_tiny, enwik8
from rwkv_jax.train import step as step_lib

PAPER_R2 = 0.994  # the paper's Section 5: loss against compute, linear in log-log


def _cpu_config():
  c = char_tiny.get_config()
  c.model.update(ctx_len=128)
  c.train.update(batch_size=8, eval_batches=0, export=False)
  return c


def _gpu_config():
  c = enwik8.get_config()
  c.train.update(batch_size=32, eval_batches=100, export=False)
  return c


def _tiny_config():
  c = char_tiny.get_config()
  c.model.update(ctx_len=16)
  c.optim.update(warmup_steps=1)
  c.train.update(batch_size=8, eval_batches=2, export=False, async_checkpoints=False)
  return c


# (base config, [(n_layer, n_embd)], tokens per parameter, smallest number of steps)
SIZES = {
    "tiny": (_tiny_config, [(1, 8), (1, 16), (1, 24)], 0.05, 3),
    "cpu": (_cpu_config, [(1, 32), (1, 48), (2, 48), (2, 64), (3, 80), (4, 96)], 5.0, 100),
    "gpu": (_gpu_config, [(2, 128), (4, 192), (4, 256), (6, 320), (6, 384), (8, 512)], 20.0,
            200),
}


def _define_flags() -> None:
  """Flags exist only when this file runs as a program (no clash with other runners in a test)."""
  flags.DEFINE_enum("size", "cpu", sorted(SIZES), "cpu: 6 sizes on the Wikipedia sample, about "
                    "ten minutes on a CPU; gpu: 6 sizes to 27M parameters on enwik8; tiny: tests.")
  flags.DEFINE_float("tokens_per_param", 0.0, "Training tokens per parameter; 0 = the size's.",
                     lower_bound=0.0)
  _runs.define_flags("scaling", "gpu_gpu_h100")
  flags.adopt_module_key_flags(_runs)  # --helpshort lists them with the flags above


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> dict[str, float]:
  """Least squares of log10(loss) = slope * log10(compute) + intercept, and its r^2.

  loss = 10**intercept * compute**slope; r^2 is that of the line in log-log coordinates.
  """
  x, y = np.log10(np.asarray(compute, float)), np.log10(np.asarray(loss, float))
  if len(x) < 2 or np.ptp(x) == 0:
    raise ValueError(f"A power law needs points at two or more computes; got {len(x)}.")
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (slope * x + intercept)
  total = float(np.sum((y - y.mean()) ** 2))
  r2 = 1.0 - float(np.sum(residual ** 2)) / total if total > 0 else 1.0
  return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


def size_config(size: str, n_layer: int, n_embd: int, tokens_per_param: float):
  """The training config of one point: the size's base with this shape and its token budget."""
  base, _, _, min_steps = SIZES[size]
  c = base()
  c.model.update(n_layer=n_layer, n_embd=n_embd)
  n = step_lib.model_config(c).num_params()
  tokens_per_step = c.train.batch_size * c.model.ctx_len
  steps = max(min_steps, math.ceil(tokens_per_param * n / tokens_per_step))
  warmup = min(c.optim.warmup_steps, max(1, steps // 10))
  c.optim.update(warmup_steps=warmup)
  c.train.update(steps=steps, log_every=max(1, steps // 20), eval_every=steps,
                 checkpoint_every=max(1, steps // 4))
  return c


def run(size: str, workdir: str | pathlib.Path, tokens_per_param: float = 0.0) -> dict:
  """Trains every size of `size` (resuming) and fits the power law; returns the record."""
  _, shapes, default_ratio, _ = SIZES[size]
  ratio = tokens_per_param or default_ratio
  workdir = pathlib.Path(workdir) / f"scaling_{size}"
  points = []
  for i, (n_layer, n_embd) in enumerate(shapes):
    config = size_config(size, n_layer, n_embd, ratio)
    cfg = step_lib.model_config(config)
    name = f"L{n_layer}_D{n_embd}"
    logging.info("scaling point %d of %d: %s", i + 1, len(shapes), name)
    r = _runs.train_run(name, config, workdir / name, num_params=cfg.num_params(),
                        flops_per_token=cfg.flops_per_token())
    r["six_n_d"] = 6 * r["num_params"] * r["tokens"]
    r["tokens_per_param"] = r["tokens"] / r["num_params"]
    points.append(r)
  compute = [p["train_flops"] for p in points]
  loss = [p["val_loss"] for p in points]
  fit = fit_power_law(compute, loss)
  fit_6nd = fit_power_law([p["six_n_d"] for p in points], loss)
  base = SIZES[size][0]()
  return {
      "benchmark": "scaling_loss_vs_compute",
      "environment": benchlib.environment(),
      "size": size,
      "data": dict(base.data),
      "budget_rule": f"tokens = {ratio:g} x parameters (at least {SIZES[size][3]} steps); "
                     "compute = the model's matrix-product training FLOPs per token x tokens",
      "evaluation": "final validation loss (nats per byte) over the whole held-out split"
                    if not base.train.eval_batches else
                    f"final validation loss (nats per byte), {base.train.eval_batches} batches",
      "fit": {**fit, "exponent": fit["slope"],
              "form": "log10(loss) = slope * log10(compute_flops) + intercept"},
      "fit_6nd": fit_6nd,
      "paper_r2": PAPER_R2,
      "points": [{k: p[k] for k in ("name", "num_params", "steps", "tokens", "tokens_per_param",
                                    "train_flops", "six_n_d", "val_loss", "val_bits_per_token",
                                    "wall_s", "train_tokens_per_s")}
                 for p in points],
      "runs": points,
  }


def plot(record: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top

  pts, fit = record["points"], record["fit"]
  compute = np.array([p["train_flops"] for p in pts])
  loss = np.array([p["val_loss"] for p in pts])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.loglog(compute, loss, "o", label="RWKV, final held-out loss")
  for p, c, l in zip(pts, compute, loss):
    ax.annotate(f"{p['name']}\n{p['num_params'] / 1e3:.0f}k", (c, l), fontsize=7,
                xytext=(4, 4), textcoords="offset points")
  xs = np.geomspace(compute.min(), compute.max(), 50)
  ax.loglog(xs, 10 ** fit["intercept"] * xs ** fit["slope"], "--",
            label=f"fit: loss ~ C^{fit['slope']:.3f}, r$^2$ = {fit['r2']:.3f} "
                  f"(paper: {record['paper_r2']})")
  env = record["environment"]
  ax.set(xlabel="training compute (FLOPs)", ylabel="validation loss (nats per byte)",
         title=f"{record['data']['source']}, {record['budget_rule'].split(';')[0]}, "
               f"{env.get('device_kind', '')}")
  ax.title.set_fontsize(9)
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  plots.save_figure(fig, path)


def save(record: dict, out: str | pathlib.Path, tag: str) -> pathlib.Path:
  """Writes OUT/scaling_TAG.json and its plot OUT/scaling_TAG.png; returns the JSON's path."""
  return _runs.save_record("scaling", record, out, tag, plot)


def main(argv):
  del argv
  out = _runs.start()
  f = flags.FLAGS
  record = run(f.size, f.workdir, f.tokens_per_param)
  path = save(record, out, f.tag or _runs.default_tag(f.size))
  fit = record["fit"]
  print(f"{len(record['points'])} sizes: loss ~ C^{fit['slope']:.4f}, r^2 = {fit['r2']:.4f} "
        f"(paper {PAPER_R2}). Wrote {path}")


if __name__ == "__main__":
  _define_flags()
  _runs.run_cli(main)
