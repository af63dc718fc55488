"""experiments/finetune_learns.py on a tiny base and a few steps: the record it writes and the
consistency of its fields (not whether the tiny budget learns)."""

import json

import pytest

from experiments import finetune_learns


@pytest.mark.slow
def test_runner_writes_a_consistent_record_and_chart(tmp_path):
  record = finetune_learns.run(tmp_path / "runs", base_steps=2, steps=2,
                               modes=("lora", "state"), batch_size=8, r=2, eval_window=64,
                               eval_bytes=256, tiny=True)
  path = finetune_learns._runs.save_record(finetune_learns.NAME, record, tmp_path / "out", "t",
                                           finetune_learns.plot)
  saved = json.loads(path.read_text())
  assert (tmp_path / "out" / "finetune_learns_t.png").stat().st_size > 0
  env = saved["environment"]
  assert env["date_utc"] and env["device_kind"] and env["command"] and "jax" in env
  s = saved["settings"]
  assert (s["steps"], s["base_steps"], s["ctx_len"]) == (2, 2, 32)
  assert s["code"]["package"] == "absl" and s["code"]["train_files"] > 0
  assert s["code"]["held_out_files"] and s["code"]["train_bytes"] > s["code"]["held_out_bytes"]
  base = saved["base"]
  assert [x["mode"] for x in saved["results"]] == ["lora", "state"]
  for x in saved["results"]:
    for key in ("code", "english"):
      assert 0 < x[f"{key}_bits_per_byte"] < 9 and 0 < base[f"{key}_bits_per_byte"] < 9
      assert x[f"{key}_delta"] == pytest.approx(x[f"{key}_bits_per_byte"]
                                                - base[f"{key}_bits_per_byte"])
    assert x["wall_s"] > 0 and x["train_curve"] and x["train_curve"][-1][0] == 2
    assert (tmp_path / "runs" / x["mode"] / "adapters").is_dir()
