"""The paper's RWKV-4 Pile models (Tables 2 and 3), chosen by a size parameter.

  python -m experiments.train --config=experiments/configs/pile.py:169m --workdir=DIR \
      --config.data.path=/data/pile_text_document

Sizes: 169m, 430m, 1b5, 3b, 7b, 14b. data.path is a binidx prefix (PREFIX.bin + PREFIX.idx,
GPT-NeoX 20B tokens, as the official trainer reads); a plain text file is encoded with the same
tokenizer once, into WORKDIR/data. Learning rates are the paper's Table 3; context 1024, bf16.
"""

from rwkv_jax.config import Preset
from rwkv_jax.train import config as train_config

# size -> (preset, lr_init, lr_final), paper Table 3.
SIZES = {
    "169m": (Preset.RWKV4_169M, 6e-4, 1e-5),
    "430m": (Preset.RWKV4_430M, 4e-4, 1e-5),
    "1b5": (Preset.RWKV4_1B5, 3e-4, 1e-5),
    "3b": (Preset.RWKV4_3B, 1.5e-4, 1e-5),
    "7b": (Preset.RWKV4_7B, 1.5e-4, 1e-5),
    "14b": (Preset.RWKV4_14B, 1e-4, 7e-6),
}


def get_config(size: str = "169m"):
  if size not in SIZES:
    raise ValueError(f"Unknown Pile model size {size!r}; use --config=experiments/configs/"
                     f"pile.py:SIZE with SIZE one of {sorted(SIZES)}.")
  preset, lr_init, lr_final = SIZES[size]
  n_layer, n_embd = preset.value
  c = train_config.default_config()
  c.model.update(n_layer=n_layer, n_embd=n_embd, vocab_size=50277, ctx_len=1024,
                 dtype="bfloat16", param_dtype="float32", remat=n_embd >= 2048)
  c.data.update(source="file", path="", tokenizer="neox", val_fraction=0.001)
  c.optim.update(lr_init=lr_init, lr_final=lr_final)
  c.train.update(steps=100_000, batch_size=128, log_every=50, eval_every=2000,
                 checkpoint_every=1000)
  return c
