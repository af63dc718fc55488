"""Where training metrics go: TensorBoard event files and WORKDIR/metrics.jsonl (process 0 only).

metrics.jsonl holds one JSON record per line, {"step": s, "train/loss": ..., ...}, appended so
that a resumed run continues its history; a run resumed from step s first drops the records past
s (steps the crashed run logged after its last checkpoint), so no step appears twice. It is
what experiments/plots.py draws and what tests read back. TensorBoard files come from
tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import pathlib

from rwkv_jax import files

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Writes scalar records to TensorBoard and metrics.jsonl; does nothing when not enabled."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, *,
               start_step: int | None = None):
    """Opens the writers under `workdir` (only if `enabled`: other processes write nothing).

    Args:
      workdir: the run's directory.
      enabled: whether this process writes.
      start_step: the step the run starts from (0, or the resumed checkpoint's); records after
        it are removed from metrics.jsonl first. None keeps every record.
    """
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      workdir = pathlib.Path(workdir)
      if start_step is not None:
        _drop_records_after(workdir / METRICS_FILE, start_step)
      self._tb = SummaryWriter(str(workdir / "tb"))
      self._jsonl = open(workdir / METRICS_FILE, "a", encoding="utf-8")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Records `metrics` at `step`; non-finite values go to the JSON file only."""
    if not self.enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()  # a killed run keeps every record it logged
    for k, v in record.items():
      if k != "step" and math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _drop_records_after(path: pathlib.Path, step: int) -> None:
  """Rewrites the JSON lines file `path` (atomically) without its records past `step`."""
  if not path.exists():
    return
  lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
  kept = [line for line in lines if _step_of(line) <= step]
  if len(kept) < len(lines):
    with files.atomic_write(path, "w") as f:
      f.write("".join(line + "\n" for line in kept))


def _step_of(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return math.inf  # a record torn by a kill mid-write goes too


def read_history(workdir: str | pathlib.Path) -> list[dict[str, float]]:
  """The records of WORKDIR/metrics.jsonl in the order they were written."""
  text = (pathlib.Path(workdir) / METRICS_FILE).read_text(encoding="utf-8")
  return [json.loads(line) for line in text.splitlines() if line.strip()]
