"""Fine-tuning a released RWKV-4 (experiments/finetune.py): LoRA on a text file by default.

  python -m experiments.finetune --base=RWKV-4-Pile-169M.pth --config=experiments/configs/finetune.py \
      --workdir=/tmp/ft --config.data.path=my.txt --config.data.tokenizer=neox
  --config.finetune.mode=state (or full, lora+state); --config.finetune.r=16 ...

The model's shape and dtypes come from the base; model.ctx_len is the training window.
"""

from rwkv_jax.train import finetune


def get_config():
  c = finetune.default_config()
  c.data.update(source="file", tokenizer="neox", val_fraction=0.02)
  return c
