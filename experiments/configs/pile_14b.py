"""RWKV-4 Pile 14B (paper Tables 2 and 3): the same as `--config=experiments/configs/pile.py:14b`."""

from experiments.configs import pile


def get_config():
  return pile.get_config("14b")
