r"""Character-level modelling (the paper's enwik8 comparison): RWKV against a Transformer.

Both models have the same depth, width, vocabulary (bytes) and, within 1%, parameter count; they
see the same training windows in the same order, with the same optimizer, schedule and steps, in
the same trainer (`train_loop.train_and_evaluate`, the Transformer through its `make_model` hook).
Each is scored by the trainer's validation loss over the whole held-out tail of the stream, in
nats / ln 2 per byte: bits per character as enwik8 counts them (one byte, one character).

  python -m experiments.char_level                 # L4 D128 ctx 128 on the Wikipedia sample, CPU
  python -m experiments.char_level --size=paper    # enwik8, L12 D512 ctx 1024: an accelerator

Every run trains in --workdir/char_<size>/<model>; a re-run skips finished runs and resumes an
unfinished one from its checkpoints. Writes experiments/results/char_<tag>.json and .png.
"""

from __future__ import annotations

import math
import pathlib

from absl import flags

from experiments import _runs, benchlib, plots
from experiments.baselines import transformer as tf_lib
from experiments.configs import char_tiny, enwik8
from rwkv_jax.train import step as step_lib


def _cpu_config():
  """The demo corpus and recipe (char_tiny) with a smaller model and context."""
  c = char_tiny.get_config()
  c.model.update(n_layer=4, n_embd=128, ctx_len=128)
  c.train.update(steps=1000, batch_size=16, log_every=50, eval_every=250, eval_batches=0,
                 checkpoint_every=250, export=False)
  return c


def _tiny_config():
  """Seconds on a CPU, for tests: a handful of steps of a one-layer model."""
  c = char_tiny.get_config()
  c.model.update(n_layer=1, n_embd=32, ctx_len=32)
  c.optim.update(warmup_steps=1)
  c.train.update(steps=4, batch_size=8, log_every=2, eval_every=4, eval_batches=2,
                 checkpoint_every=4, export=False, async_checkpoints=False)
  return c


def _paper_config():
  c = enwik8.get_config()
  c.train.update(eval_batches=0, export=False)
  return c


SIZES = {"tiny": _tiny_config, "cpu": _cpu_config, "paper": _paper_config}


def _define_flags() -> None:
  """Flags exist only when this file runs as a program (no clash with other runners in a test)."""
  flags.DEFINE_enum("size", "cpu", sorted(SIZES), "cpu: the Wikipedia sample, minutes on a CPU; "
                    "paper: enwik8 with the paper's L12 D512 ctx 1024 (experiments/configs/"
                    "enwik8.py); tiny: seconds, for tests.")
  flags.DEFINE_integer("steps", 0, "Training steps of each model; 0 = the size's.", lower_bound=0)
  flags.DEFINE_float("lr_init", 0.0, "Peak learning rate of both models; 0 = the size's. Runs "
                     "and results then carry an _lr<rate> suffix.", lower_bound=0.0)
  _runs.define_flags("char", "paper_gpu_h100")
  flags.adopt_module_key_flags(_runs)  # --helpshort lists them with the flags above


def run(size: str, workdir: str | pathlib.Path, steps: int = 0, lr_init: float = 0.0) -> dict:
  """Trains both models of `size` (resuming) and returns the comparison's record."""
  config = SIZES[size]()
  if steps:
    config.train.steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, steps // 10))
  if lr_init:
    config.optim.lr_final *= lr_init / config.optim.lr_init  # the same decay, scaled
    config.optim.lr_init = lr_init
  rwkv_cfg = step_lib.model_config(config)
  tf_cfg = tf_lib.TransformerConfig.from_training(config)
  workdir = pathlib.Path(workdir) / f"char_{size}{_lr_suffix(lr_init)}"
  runs = {
      "rwkv": _runs.train_run("rwkv", config, workdir / "rwkv",
                              num_params=rwkv_cfg.num_params(),
                              flops_per_token=rwkv_cfg.flops_per_token()),
      "transformer": _runs.train_run("transformer", config, workdir / "transformer",
                                     make_model=tf_lib.build_model,
                                     num_params=tf_cfg.num_params(),
                                     flops_per_token=_transformer_flops_per_token(tf_cfg),
                                     rules=tf_lib.PARAM_RULES),
  }
  for name, cfg in (("rwkv", rwkv_cfg.to_dict()), ("transformer", dict(tf_cfg.__dict__))):
    runs[name]["model"] = cfg
  return {
      "benchmark": "char_level_bits_per_char",
      "environment": benchlib.environment(),
      "size": size,
      "data": dict(config.data),
      "evaluation": "trainer validation loss over the whole held-out split (the last "
                    f"{config.data.val_fraction:.0%} of the byte stream), nats / ln 2 per byte",
      "steps": config.train.steps,
      "optim": dict(config.optim),
      "tokens_per_model": runs["rwkv"]["tokens"],
      "param_ratio_transformer_to_rwkv": runs["transformer"]["num_params"] /
                                         runs["rwkv"]["num_params"],
      "val_bits_per_char": {k: r["val_bits_per_token"] for k, r in runs.items()},
      "runs": runs,
  }


def _transformer_flops_per_token(cfg: tf_lib.TransformerConfig) -> int:
  """Training FLOPs per token as RWKVConfig.flops_per_token counts them, plus attention's.

  Attention's scores and weighted values cost 2 * ctx * c MACs per token per layer (the causal
  mask is not exploited by this baseline).
  """
  c, f, v = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size
  macs = cfg.n_layer * (4 * c * c + 2 * c * f + 2 * cfg.ctx_len * c) + v * c
  return 6 * macs


def plot(record: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.2))
  for (name, r), color in zip(record["runs"].items(), ("C0", "C1")):
    label = f"{name} ({r['num_params'] / 1e6:.2f}M)"
    steps, loss = zip(*r["train_curve"])
    ax.plot(steps, [l / math.log(2) for l in loss], color=color, alpha=0.5, label=f"{label} train")
    steps, loss = zip(*r["val_curve"])
    ax.plot(steps, [l / math.log(2) for l in loss], "o-", color=color,
            label=f"{label} held-out: {r['val_bits_per_token']:.3f}")
  m = record["runs"]["rwkv"]["model"]
  env = record["environment"]
  ax.set(xlabel="step", ylabel="bits per character",
         title=f"L{m['n_layer']} D{m['n_embd']} ctx {m['ctx_len']}, {record['data']['source']}, "
               f"{record['tokens_per_model'] / 1e6:.1f}M tokens each, {env.get('device_kind', '')}")
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  plots.save_figure(fig, path)


def save(record: dict, out: str | pathlib.Path, tag: str) -> pathlib.Path:
  """Writes OUT/char_TAG.json and its plot OUT/char_TAG.png; returns the JSON's path."""
  return _runs.save_record("char", record, out, tag, plot)


def _lr_suffix(lr_init: float) -> str:
  return f"_lr{lr_init:g}" if lr_init else ""


def main(argv):
  del argv
  out = _runs.start()
  f = flags.FLAGS
  record = run(f.size, f.workdir, f.steps, f.lr_init)
  path = save(record, out, f.tag or _runs.default_tag(f.size, _lr_suffix(f.lr_init)))
  bpc = record["val_bits_per_char"]
  print(f"held-out bits per char after {record['steps']} steps: RWKV {bpc['rwkv']:.4f}, "
        f"Transformer {bpc['transformer']:.4f}. Wrote {path}")


if __name__ == "__main__":
  _define_flags()
  _runs.run_cli(main)
