r"""Context length (the paper's Section 5 / Figure 6 claim, C4): loss against token position.

One small RWKV is trained three times on the same byte stream with the same recipe, the same
tokens per step and the same steps, differing only in the training window (256, 1,024 and 4,096
tokens; windows longer than the chunk are trained in chunks that carry the state, full BPTT,
rwkv_jax/train/bptt.py). Each is then scored on held-out segments of 4,096 tokens, every segment from
an empty state, by the mean loss at each token position (rwkv_jax/scoring.loss_by_position).
The claim: a model trained on longer windows goes on lowering its loss deeper into the sequence.

  python -m experiments.long_context               # L4 D128, the Wikipedia sample, 2 CPU cores
  python -m experiments.long_context --size=gpu    # L6 D512, enwik8, windows 1k/4k/16k

Every run trains in --workdir/context_<size>/ctx<window>; a re-run skips finished runs (and
finished scorings) and resumes an unfinished one. Writes experiments/results/context_<tag>.json
and .png.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any

import numpy as np
from absl import flags

from experiments import _runs, benchlib, plots
from experiments.configs import char_tiny, enwik8
from rwkv_jax.data import pipeline as data_pipeline
from rwkv_jax.data import sources as data_sources
from rwkv_jax.infer import scoring
from rwkv_jax.io import checkpoint as ckpt_lib
from rwkv_jax.train import step as step_lib

POSITION_FILE = "position_loss.json"


def _cpu_config():
  c = char_tiny.get_config()
  c.model.update(n_layer=4, n_embd=128)
  c.data.update(val_fraction=0.03)
  c.optim.update(lr_init=2e-3, lr_final=2e-4, warmup_steps=16)
  c.train.update(steps=160, log_every=10, eval_batches=8, export=False)
  return c


def _gpu_config():
  c = enwik8.get_config()
  c.model.update(n_layer=6, n_embd=512)
  c.train.update(steps=5000, log_every=50, eval_batches=20, export=False)
  return c


def _tiny_config():
  c = char_tiny.get_config()
  c.model.update(n_layer=1, n_embd=16)
  c.optim.update(warmup_steps=1)
  c.train.update(steps=3, log_every=1, eval_batches=1, export=False, async_checkpoints=False)
  return c


# base config, training windows, chunk_len, tokens per step, positions scored, segments scored
SIZES = {
    "tiny": (_tiny_config, (8, 16, 32), 8, 256, 32, 4),
    "cpu": (_cpu_config, (256, 1024, 4096), 512, 8192, 4096, 0),
    "gpu": (_gpu_config, (1024, 4096, 16384), 1024, 65536, 16384, 0),
}


def _define_flags() -> None:
  """Flags exist only when this file runs as a program (no clash with other runners in a test)."""
  flags.DEFINE_enum("size", "cpu", sorted(SIZES), "cpu: L4 D128 on the Wikipedia sample, about "
                    "a quarter of an hour on 2 CPU cores; gpu: L6 D512 on enwik8, windows to "
                    "16k, an accelerator; tiny: seconds, for tests.")
  flags.DEFINE_integer("steps", 0, "Training steps of each model; 0 = the size's.", lower_bound=0)
  _runs.define_flags("context", "gpu_gpu_h100")
  flags.adopt_module_key_flags(_runs)  # --helpshort lists them with the flags above


def window_config(size: str, window: int, steps: int = 0):
  """The training config of one window: the size's recipe, batch = tokens per step / window."""
  base, _, chunk_len, tokens_per_step, _, _ = SIZES[size]
  c = base()
  if steps:
    c.train.steps = steps
    c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, steps // 10))
  c.model.ctx_len = window
  c.train.update(batch_size=max(1, tokens_per_step // window),
                 chunk_len=chunk_len if window > chunk_len else 0, bptt="full",
                 eval_every=c.train.steps, checkpoint_every=max(1, c.train.steps // 4))
  return c


def held_out_segments(config, workdir: pathlib.Path, length: int, count: int) -> np.ndarray:
  """[n, length + 1] consecutive segments of the stream's held-out tail (count 0: all of them).

  The tail is what the trainer holds out (`data.val_fraction`, the same for every window), so
  no segment was trained on.
  """
  source = data_sources.open_training_source(config.data, workdir, config.model.vocab_size)
  tokens = source.tokens
  start = data_pipeline.split_stream(len(tokens), config.model.ctx_len,
                                config.data.val_fraction).train_end
  n = (len(tokens) - start) // (length + 1)
  if count:
    n = min(n, count)
  if n == 0:
    raise ValueError(f"The held-out tail of {source.path} ({len(tokens) - start} tokens) is "
                     f"shorter than one segment of {length + 1}; raise data.val_fraction.")
  return np.asarray(tokens[start:start + n * (length + 1)], np.int32).reshape(n, length + 1)


def score_positions(workdir: pathlib.Path, segments: np.ndarray, chunk: int,
                    steps: int) -> dict[str, Any]:
  """Loss by position of the model trained in `workdir` (its latest checkpoint, after `steps`),
  cached there for the same segments and steps."""
  done = workdir / POSITION_FILE
  key = {"segments": list(segments.shape), "first_tokens": segments[:, :8].tolist(),
         "steps": steps}
  if done.exists():
    saved = json.loads(done.read_text())
    if saved.get("key") == key:
      return saved
  model, _ = ckpt_lib.load_export(workdir)
  result = scoring.loss_by_position(model, list(segments), batch_size=len(segments),
                                    chunk=chunk)
  record = {"key": key, **result.to_json()}
  benchlib.write_json(done, record)
  return record


def _log_bins(mean_loss: list[float | None], bins_per_octave: int = 4
              ) -> list[tuple[float, float]]:
  """(geometric centre position, mean loss) over log-spaced bins of positions, for the plot."""
  p = len(mean_loss)
  edges = np.unique(np.round(2 ** np.arange(0, math.log2(p) + 1e-9, 1 / bins_per_octave)))
  edges = np.append(edges, p + 1).astype(int)
  out = []
  for a, b in zip(edges[:-1], edges[1:]):
    values = [v for v in mean_loss[a - 1:b - 1] if v is not None]
    if values:
      out.append((float(math.sqrt(a * (b - 1))), float(np.mean(values))))
  return out


def _span_mean(mean_loss: list[float | None], first: int, last: int) -> float | None:
  values = [v for v in mean_loss[first - 1:last] if v is not None]
  return float(np.mean(values)) if values else None


def run(size: str, workdir: str | pathlib.Path, steps: int = 0) -> dict[str, Any]:
  """Trains one model per window of `size` (resuming), scores each; returns the record."""
  _, windows, chunk_len, tokens_per_step, positions, count = SIZES[size]
  workdir = pathlib.Path(workdir) / f"context_{size}"
  segments = None
  runs = {}
  for i, window in enumerate(windows):
    config = window_config(size, window, steps)
    cfg = step_lib.model_config(config)
    name = f"ctx{window}"
    logging.info("context run %d of %d: window %d, batch %d, chunk_len %d", i + 1, len(windows),
                 window, config.train.batch_size, config.train.chunk_len)
    r = _runs.train_run(name, config, workdir / name, num_params=cfg.num_params(),
                        flops_per_token=cfg.flops_per_token())
    if segments is None:
      segments = held_out_segments(config, workdir / name, positions, count)
    logging.info("%s: loss by position over %d held-out segments of %d tokens", name,
                 len(segments), positions)
    scored = score_positions(workdir / name, segments, min(positions, 1024), r["steps"])
    mean_loss = scored["mean_loss"]
    r.update(window=window, chunk_len=config.train.chunk_len,
             batch_size=config.train.batch_size, buckets=scored["buckets"],
             loss_by_position_log_bins=_log_bins(mean_loss),
             mean_loss_by_span={f"{a}-{b}": _span_mean(mean_loss, a, b)
                                for a, b in _spans(windows, positions)})
    runs[name] = r
  base = window_config(size, windows[0], steps)
  spans = [f"{a}-{b}" for a, b in _spans(windows, positions)]
  deepest = spans[-1]
  by_window = {n: r["mean_loss_by_span"][deepest] for n, r in runs.items()}
  return {
      "benchmark": "context_length_loss_by_position",
      "environment": benchlib.environment(),
      "size": size,
      "data": dict(base.data),
      "model": step_lib.model_config(base).to_dict() | {"ctx_len": None},
      "optim": dict(base.optim),
      "steps": base.train.steps,
      "tokens_per_step": tokens_per_step,
      "tokens_per_model": base.train.steps * tokens_per_step,
      "evaluation": f"{len(segments)} consecutive segments of {positions + 1} tokens from the "
                    f"held-out tail (the last {base.data.val_fraction:.0%} of the stream), each "
                    "scored from an empty state; mean loss (nats per token) at each position, "
                    "segments starting at arbitrary points of the text as training windows do",
      "spans": spans,
      f"mean_loss_{deepest}": by_window,
      "longer_windows_lower_deep_loss": all(
          a > b for a, b in zip(list(by_window.values()), list(by_window.values())[1:])),
      "runs": runs,
  }


def _spans(windows, positions) -> list[tuple[int, int]]:
  """Position spans cut at the training windows: 1-w0, w0+1-w1, ..., up to `positions`."""
  edges = [0] + [w for w in windows if w < positions] + [positions]
  return [(a + 1, b) for a, b in zip(edges[:-1], edges[1:])]


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for (name, r), color in zip(record["runs"].items(), ("C0", "C1", "C2", "C3")):
    x, y = zip(*r["loss_by_position_log_bins"])
    chunked = f", chunks of {r['chunk_len']}" if r["chunk_len"] else ""
    ax.plot(x, [v / math.log(2) for v in y], "o-", ms=3, color=color,
            label=f"trained on {r['window']}-token windows{chunked}")
    ax.axvline(r["window"], color=color, ls=":", alpha=0.7)
  m, env = record["model"], record["environment"]
  ax.set(xscale="log", xlabel="token position in a held-out segment",
         ylabel="bits per token (mean over segments)",
         title=f"L{m['n_layer']} D{m['n_embd']}, {record['data']['source']}, "
               f"{record['tokens_per_model'] / 1e6:.1f}M tokens each, {env.get('device_kind', '')}")
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  plots.save_figure(fig, path)


def save(record: dict[str, Any], out: str | pathlib.Path, tag: str) -> pathlib.Path:
  """Writes OUT/context_TAG.json and its plot OUT/context_TAG.png; returns the JSON's path."""
  return _runs.save_record("context", record, out, tag, plot)


def main(argv):
  del argv
  out = _runs.start()
  f = flags.FLAGS
  record = run(f.size, f.workdir, f.steps)
  path = save(record, out, f.tag or _runs.default_tag(f.size))
  span = record["spans"][-1]
  losses = ", ".join(f"{k} {v / math.log(2):.3f}" for k, v in
                     record[f"mean_loss_{span}"].items())
  print(f"bits per token at positions {span}: {losses}. Wrote {path}")


if __name__ == "__main__":
  _define_flags()
  _runs.run_cli(main)
