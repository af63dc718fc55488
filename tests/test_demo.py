"""`make demo`'s entry point runs end to end (a few steps: the contract, not the quality)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
def test_demo_trains_scores_samples_and_records(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.demo", f"--workdir={tmp_path / 'demo'}", "--steps=3",
       "--sample_chars=20"], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "bits per character after 3 steps" in result.stdout
  assert "sample:\n<page>" in result.stdout
  record = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
  assert record["steps"] == 3 and record["val_bits_per_char"] > 0
  assert (tmp_path / "demo" / "export" / "rwkv_jax.json").is_file()
  assert (tmp_path / "demo" / "loss.png").is_file()
