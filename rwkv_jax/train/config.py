"""The training config: every key `train.train_and_evaluate` reads, with its default, in one place.

Experiment configs (experiments/configs/*.py) start from `default_config()` and override what
differs; `--config.section.key=value` overrides on the command line. `check` rejects a config
with a missing or unknown key, or with flags that disagree, raising a ConfigError that names the
flags to change.
"""

from __future__ import annotations

from typing import Any

import ml_collections

BPTT_MODES = ("full", "truncated")


class ConfigError(ValueError):
  """A training config that `check` rejects; the message names the flags to change."""


def default_config() -> ml_collections.ConfigDict:
  """The defaults of every training key: the official RWKV-4 169M recipe on a file of bytes."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.n_layer = 12  # blocks
  c.model.n_embd = 768  # model width
  c.model.vocab_size = 50277  # GPT-NeoX 20B vocabulary; 256 for bytes
  c.model.dim_att = 0  # time-mixing width; 0 = n_embd
  c.model.dim_ffn = 0  # channel-mixing hidden width; 0 = 4 * n_embd
  c.model.ctx_len = 1024  # tokens per training example
  c.model.dtype = "bfloat16"  # compute dtype; the WKV state is float32 whatever this is
  c.model.param_dtype = "float32"  # stored parameters (and optimizer moments)
  c.model.init = "official"  # "official" (the v4neo trainer) or "paper" (Appendix E)
  c.model.remat = False  # rematerialize each block in the backward pass (memory for compute)

  c.data = ml_collections.ConfigDict()
  c.data.source = "file"  # wiki_sample (the demo corpus), enwik8 (downloaded), or file
  c.data.path = ""  # for source=file: a text/byte file, a directory, or a binidx prefix
  c.data.tokenizer = "bytes"  # bytes, or neox / world / PATH: a text file is encoded once
  c.data.val_fraction = 0.01  # the stream's tail held out for validation
  c.data.seed = 0  # shuffle seed of the training windows
  c.data.worker_count = 0  # grain worker processes; 0 reads in the training process

  # The official RWKV-4 recipe (rwkv_jax/train/optim.py): Adam, layerwise LR, warmup, exp. decay.
  c.optim = ml_collections.ConfigDict()
  c.optim.lr_init = 6e-4  # peak learning rate
  c.optim.lr_final = 1e-5  # rate at the last step (decay runs over train.steps)
  c.optim.warmup_steps = 100  # linear warmup from 0.2 * lr_init
  c.optim.betas = (0.9, 0.99)  # Adam (b1, b2)
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.weight_decay = 0.0  # decoupled, on >= 2-D parameters only
  c.optim.grad_clip = 1.0  # global gradient norm bound; <= 0 disables
  c.optim.layerwise_lr = True  # time_decay x2, time_first x3 learning rates
  c.optim.l2wrap = 1e-4  # L2Wrap strength (rwkv_jax/train/losses.py); 0 disables

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10000  # optimizer updates
  c.train.batch_size = 16  # global sequences per update
  c.train.accumulate_steps = 1  # micro-batches per update (divides batch_size)
  # Long windows (rwkv_jax/train/bptt.py): each window runs in chunks of chunk_len tokens that carry
  # the recurrent state, so activation memory follows the chunk; 0 = the whole window in one call.
  # bptt "full" gives one-shot training's exact gradients (chunks recomputed in the backward
  # pass); "truncated" stops the state's gradient at every chunk boundary.
  c.train.chunk_len = 0  # tokens per chunk, up to model.ctx_len; need not divide it
  c.train.bptt = "full"  # "full" or "truncated"
  c.train.seed = 0  # parameter init
  c.train.impl = "auto"  # WKV implementation (rwkv_jax/wkv.py)
  c.train.log_every = 50  # steps between training-metric records
  c.train.eval_every = 1000  # steps between validations; 0 = none
  c.train.eval_batches = 20  # validation batches per evaluation; 0 = the whole split
  c.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
  c.train.keep_checkpoints = 3  # newest checkpoints kept
  c.train.async_checkpoints = True  # save in the background while training goes on
  c.train.export = True  # write an inference export (WORKDIR/export) at the end
  c.train.progress_bar = True  # a tqdm bar when stderr is a terminal, else log lines

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel ways; -1 = all devices left over
  c.mesh.fsdp = 1  # parameter-sharding ways
  c.mesh.tensor = 1  # tensor-parallel ways (channels)
  return c


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming what to change if `config` is not a valid training config.

  Args:
    config: a config built from `default_config()`.
  """
  _check_keys(config, default_config(), "config")
  o, t = config.optim, config.train
  if o.lr_final != o.lr_init and t.steps <= o.warmup_steps:
    raise ConfigError(f"--config.train.steps={t.steps} must exceed --config.optim.warmup_steps="
                      f"{o.warmup_steps} (the learning rate decays after the warmup); lower the "
                      f"warmup or train longer.")
  # Zero would divide by zero in the loop's step arithmetic, and keep_checkpoints=0 would keep
  # no checkpoint, so the next run would silently start again from scratch.
  for name in ("checkpoint_every", "log_every", "keep_checkpoints"):
    if t[name] < 1:
      raise ConfigError(f"--config.train.{name}={t[name]} must be >= 1.")
  if t.bptt not in BPTT_MODES:
    raise ConfigError(f"--config.train.bptt={t.bptt!r} is not one of {BPTT_MODES}.")
  if not isinstance(t.chunk_len, int) or not 0 <= t.chunk_len <= config.model.ctx_len:
    raise ConfigError(f"--config.train.chunk_len={t.chunk_len!r} must be an integer from 0 (the "
                      f"whole window) to --config.model.ctx_len={config.model.ctx_len}.")
  if t.accumulate_steps < 1 or t.batch_size % t.accumulate_steps:
    raise ConfigError(f"--config.train.batch_size={t.batch_size} must be a multiple of "
                      f"--config.train.accumulate_steps={t.accumulate_steps} (>= 1).")


def _check_keys(got: Any, want: ml_collections.ConfigDict, where: str) -> None:
  if not hasattr(got, "keys"):
    raise ConfigError(f"{where} is {got!r}; it must be a section with keys {sorted(want)}.")
  unknown = sorted(set(got.keys()) - set(want.keys()))
  missing = sorted(set(want.keys()) - set(got.keys()))
  if unknown:
    raise ConfigError(f"Unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                      f"{where} has {sorted(want.keys())} (see rwkv_jax/train/config.py).")
  if missing:
    raise ConfigError(f"The config lacks {', '.join(f'{where}.{k}' for k in missing)}; build "
                      f"experiment configs from rwkv_jax.train.config.default_config() and "
                      f"override what differs.")
  for key, value in want.items():
    if isinstance(value, ml_collections.ConfigDict):
      _check_keys(got[key], value, f"{where}.{key}")
