r"""Trains RWKV-4.

  python -m experiments.train --config=experiments/configs/char_tiny.py --workdir=/tmp/run
  python -m experiments.train --config=experiments/configs/pile_169m.py --workdir=gs://... \
      --config.data.path=/data/pile_text_document --config.mesh.fsdp=8

Metrics go to WORKDIR/metrics.jsonl and WORKDIR/tb, the loss curve to WORKDIR/loss.png.
Re-running with the same --workdir resumes from its latest checkpoint. Multi-host: start one
process per host with --coordinator_address, --num_processes and --process_id (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables); when one
process is lost, the others stop within --heartbeat_timeout seconds with one line each.
SIGTERM or SIGINT (in any process) saves a checkpoint at the next step, prints the step and
exits with status 0; a second one exits at once. A mistake in the flags or the files they name
ends in one line and exit status 2, a failed run (divergence, a busy workdir, a full disk) in one
line and status 1; --debug shows tracebacks.
"""

import signal

from absl import flags
from ml_collections import config_flags

from experiments import _cli, _runs
from rwkv_jax import sharding

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the export.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_integer("heartbeat_timeout", None, "Seconds without word from a process after which "
                     "the others stop (multi-host); default $RWKV_JAX_HEARTBEAT_TIMEOUT, else 100.",
                     lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax

  from experiments import _logs, benchlib, plots

  _logs.quiet_third_party()

  with _cli.user_input(ValueError):  # e.g. a process id out of range
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, FLAGS.heartbeat_timeout)
  final = _runs.train(FLAGS.config, FLAGS.workdir, peak_flops=benchlib.peak_flops())
  if jax.process_index() == 0:
    plots.plot_loss(FLAGS.workdir, plots.model_title(FLAGS.config))
  if "stopped_by_signal" in final:
    name = signal.Signals(final["stopped_by_signal"]).name
    print(f"Stopped by {name} at step {final['step']} of {FLAGS.config.train.steps}, with a "
          f"checkpoint; run the same command to resume.")
    return
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(final.items())))


if __name__ == "__main__":
  # A bad config, workdir or data path is the user's to fix (status 2); a run that diverged,
  # found its workdir busy or a checkpoint unusable, or lost a process, failed (status 1).
  # --debug: tracebacks.
  _cli.run(main, failures=(*_runs.FAILURES, sharding.LostProcessError))
