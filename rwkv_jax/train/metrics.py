"""Where training metrics go: TensorBoard event files and WORKDIR/metrics.jsonl (process 0 only).

metrics.jsonl holds one JSON record per line, {"step": s, "train/loss": ..., ...}, appended so
that a resumed run continues its history; a run resumed from step s first drops the records past
s (steps the crashed run logged after its last checkpoint), so no step appears twice. It is
what experiments/plots.py draws and what tests read back. TensorBoard files come from
tensorboardX, which needs no TensorFlow; its events are written here, in the training thread
(not by tensorboardX's writer thread), so that a disk that fills up stops the run with a
`files.NoSpaceError` naming the file instead of killing that thread and blocking its queue.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

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
      from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top

      workdir = pathlib.Path(workdir)
      self._jsonl_path, self._tb_dir = workdir / METRICS_FILE, workdir / "tb"
      if start_step is not None:
        _drop_records_after(self._jsonl_path, start_step)
      with files.reporting_no_room(self._tb_dir):
        self._tb_dir.mkdir(exist_ok=True)
        self._tb = EventsWriter(str(self._tb_dir / "events"))
      self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Records `metrics` at `step`; non-finite values go to the JSON file only.

    Raises:
      files.NoSpaceError: the disk is full; the records written before are whole.
    """
    if not self.enabled:
      return
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    # A record cut short by a full disk is dropped when the run resumes (_drop_records_after).
    with files.reporting_no_room(self._jsonl_path):
      self._jsonl.write(line)
      self._jsonl.flush()  # a killed run keeps every record it logged
    with files.reporting_no_room(self._tb_dir):
      now = time.time()
      for k, v in record.items():
        if k != "step" and math.isfinite(v):
          self._tb.write_event(event_pb2.Event(wall_time=now, step=step,
                                               summary=summary.scalar(k, v)))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      try:
        with files.reporting_no_room(self._tb_dir):
          self._tb.close()
      finally:
        with files.reporting_no_room(self._jsonl_path):
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
