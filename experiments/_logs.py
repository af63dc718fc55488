"""Quiet third-party INFO chatter (Orbax logs every array it writes) in the entry points."""

import logging

from absl import logging as absl_logging

_NOISY = ("orbax", "tensorstore", "grain")


class _DropNoisyInfo(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in _NOISY)


def quiet_third_party() -> None:
  absl_logging.get_absl_handler().addFilter(_DropNoisyInfo())
