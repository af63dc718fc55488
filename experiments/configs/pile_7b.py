"""RWKV-4 Pile 7B (paper Tables 2 and 3): the same as `--config=experiments/configs/pile.py:7b`."""

from experiments.configs import pile


def get_config():
  return pile.get_config("7b")
