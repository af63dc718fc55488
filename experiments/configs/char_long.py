"""The demo model (char_tiny) on windows of 4,096 bytes, trained in chunks of 512 with full BPTT.

Each window runs as 8 chunks that carry the recurrent state (rwkv_jax/train/bptt.py): the gradients are
those of one call over the window, in about the memory of one chunk. Longer windows need only a
larger --config.model.ctx_len (and --config.train.batch_size to keep the tokens per step).
"""

from experiments.configs import char_tiny


def get_config():
  c = char_tiny.get_config()
  c.model.update(ctx_len=4096)
  c.train.update(batch_size=1, chunk_len=512, bptt="full")
  return c
