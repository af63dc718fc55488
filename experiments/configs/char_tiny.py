"""The demo: a small character-level model on the Wikipedia sample, minutes on 2 CPU cores."""

from rwkv_jax.train import config as train_config


def get_config():
  c = train_config.default_config()
  c.model.update(n_layer=4, n_embd=192, vocab_size=256, ctx_len=256, dtype="float32")
  c.data.update(source="wiki_sample", tokenizer="bytes", val_fraction=0.02)
  c.optim.update(lr_init=4e-3, lr_final=3e-4, warmup_steps=30)
  c.train.update(steps=800, batch_size=8, log_every=25, eval_every=200, eval_batches=10,
                 checkpoint_every=200)
  return c
