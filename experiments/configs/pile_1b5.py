"""RWKV-4 Pile 1B5 (paper Tables 2 and 3): the same as `--config=experiments/configs/pile.py:1b5`."""

from experiments.configs import pile


def get_config():
  return pile.get_config("1b5")
