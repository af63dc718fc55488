"""RWKV-4 Pile 169M (paper Tables 2 and 3): the same as `--config=experiments/configs/pile.py:169m`."""

from experiments.configs import pile


def get_config():
  return pile.get_config("169m")
