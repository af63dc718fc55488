r"""Records the accuracy figures quoted in the README, with device, versions, date and command.

  python -m experiments.accuracy [--out=experiments/results/accuracy_cpu.json]

1. WKV in float32 against eq. 16 in float64 at T=4096, time_decay in [-9, 4], |k| up to 60:
   max |y - y_ref| for the sequential and the associative scan (`parity.wkv_vs_float64`).
2. Parity with the reference implementations on random official-format weights: max errors of
   logits and states against the rwkv package and transformers (`parity.measure`; the same
   numbers tests/test_parity.py asserts on).
3. Precisions on a deep model whose float32 residual goes beyond float16's range: bfloat16,
   float16 and int8 logits against float32, and the rwkv package's int8 (`cpu fp32i8`) on the
   same weights (`parity.precision_vs_float32`; tests/test_precision.py asserts on them).
"""

import pathlib
import sys
import tempfile

from absl import flags

from experiments import _cli

flags.DEFINE_string("out", "experiments/results/accuracy_cpu.json", "Output JSON.")
FLAGS = flags.FLAGS
_REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv):
  del argv
  from experiments import benchlib, parity

  with tempfile.TemporaryDirectory() as tmp:
    record = {"benchmark": "accuracy", "environment": benchlib.environment(sys.argv),
              "wkv_vs_float64_T4096_k60_max_abs_error": parity.wkv_vs_float64(),
              "parity": parity.measure(tmp),
              "precision_vs_float32": parity.precision_vs_float32(tmp)}
  print(benchlib.write_json(_REPO / FLAGS.out, record))


if __name__ == "__main__":
  _cli.run(main)
