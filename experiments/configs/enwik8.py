"""Character-level enwik8 (the paper's Table 5 setting): 12 layers, width 512, context 1024.

  python -m experiments.train --config=experiments/configs/enwik8.py --workdir=/tmp/enwik8

Bytes are the tokens (vocabulary 256); the corpus is downloaded on first use (see
rwkv_jax/data/corpus.py), and the last 5% of it is held out, the usual 90/5/5 split's test part.
"""

from rwkv_jax.train import config as train_config


def get_config():
  c = train_config.default_config()
  c.model.update(n_layer=12, n_embd=512, vocab_size=256, ctx_len=1024, dtype="bfloat16")
  c.data.update(source="enwik8", tokenizer="bytes", val_fraction=0.05)
  # The official RWKV-4 enwik8 run's rates (Adam, exponential decay after warmup).
  c.optim.update(lr_init=6e-4, lr_final=1e-5, warmup_steps=1000)
  c.train.update(steps=100_000, batch_size=16, log_every=100, eval_every=2000, eval_batches=50,
                 checkpoint_every=2000)
  return c
