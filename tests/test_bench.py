"""Tests of the WKV benchmark script and its helpers: the records they write, never timings."""

import json

from absl import app
from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import pytest

from experiments import bench_wkv
from experiments import benchlib
from rwkv_jax import wkv as wkv_lib


@pytest.fixture(name="parsed_flags")
def _parsed_flags():
  # absl.app.run parses flags in the real entry point; here the defaults are enough.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(name="unloadable_backend")
def _unloadable_backend(monkeypatch):
  """A WKV backend whose module does not exist, as a kernel backend is where it cannot import."""
  monkeypatch.setitem(wkv_lib._PLUGINS, "missing", "rwkv_jax_kernels.no_such_module")  # pylint: disable=protected-access
  wkv_lib.resolve.cache_clear()
  yield "missing"
  wkv_lib.resolve.cache_clear()


@pytest.mark.slow
def test_main_writes_a_complete_record(tmp_path, parsed_flags, unloadable_backend):
  del parsed_flags
  with flagsaver.flagsaver(impls=["scan", "associative", unloadable_backend], shapes=["2x16x8"],
                           dtypes=["bfloat16"], repeats=2, out=str(tmp_path),
                           tag="test", copy_mib=4):
    bench_wkv.main(["bench_wkv"])

  record = json.loads((tmp_path / "bench_wkv_test.json").read_text())
  assert (tmp_path / "bench_wkv_test.png").stat().st_size > 0
  env = record["environment"]
  assert env["platform"] == jax.devices()[0].platform and env["device_kind"]
  assert env["jax"] == jax.__version__ and env["date_utc"].endswith("+00:00")
  assert record["memory"]["gbps"] > 0
  assert set(record["byte_model"]) >= {"fwd", "fwd_bwd"}

  entries = record["entries"]
  assert len(entries) == 3 * 2  # impls x modes, failures included.
  ok = [e for e in entries if e["status"] == "ok"]
  assert {e["impl"] for e in ok} == {"scan", "associative"}
  for e in ok:
    assert e["shape"] == [2, 16, 8]
    assert 0 < e["min_ms"] <= e["median_ms"]
    assert e["bytes"] == bench_wkv.bytes_moved((2, 16, 8), jnp.dtype(e["dtype"]), e["mode"])
    assert e["gbps"] > 0 and e["pct_roofline"] > 0
  # A backend that cannot be imported gives error entries saying why.
  missing = [e for e in entries if e["impl"] == unloadable_backend]
  assert len(missing) == 2
  assert all(e["status"] == "error" and "no_such_module" in e["error"] for e in missing)

  speedups = record["speedups"]
  assert len(speedups) == 2 and all(s["impl"] == "associative" for s in speedups)
  assert all(s["speedup"] > 0 for s in speedups)


def test_failing_entry_is_recorded_not_raised(monkeypatch):
  def broken(impl, mode):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
  monkeypatch.setattr(bench_wkv, "make_fn", broken)
  entry = bench_wkv.run_entry("scan", (1, 4, 2), "float32", "fwd", {}, 1, 1.0, None)
  assert entry["status"] == "error" and "RESOURCE_EXHAUSTED" in entry["error"]


def test_byte_model_counts_the_minimum_traffic():
  b, t, c = 2, 3, 4
  assert bench_wkv.bytes_moved((b, t, c), jnp.bfloat16, "fwd") == 3 * b * t * c * 2 + 12 * b * c + 8 * c
  assert bench_wkv.bytes_moved((b, t, c), jnp.float32, "fwd_bwd") == 8 * b * t * c * 4 + 16 * c


@pytest.mark.parametrize("spec", ["8x1024", "8x0x4", "axbxc", "8x1x2x3"])
def test_bad_shapes_are_usage_errors(spec):
  with pytest.raises(app.UsageError, match="BxTxC"):
    bench_wkv.parse_shapes([spec])


def test_parse_shapes():
  assert bench_wkv.parse_shapes(["8x1024x768", "1X16X4"]) == [(8, 1024, 768), (1, 16, 4)]


def test_default_impls_on_cpu_skip_the_interpreter():
  impls = bench_wkv.default_impls("cpu")
  assert not {"pallas", "triton"} & set(impls) and {"scan", "associative"} <= set(impls)


@pytest.mark.parametrize("kind, gbps", [("NVIDIA H100 80GB HBM3", 3350.0),
                                        ("NVIDIA H200", 4800.0), ("cpu", None)])
def test_vendor_peak(kind, gbps):
  assert benchlib.vendor_peak_gbps(kind) == gbps


@pytest.mark.parametrize("kind, flops", [("NVIDIA H100 80GB HBM3", 989e12), ("TPU v5 lite", 197e12),
                                         ("cpu", None)])
def test_peak_flops(kind, flops):
  assert benchlib.peak_flops(kind) == flops


def test_time_fn_reports_ordered_positive_times():
  timing = benchlib.time_fn(jax.jit(lambda x: x * 2), jnp.ones(8), repeats=3)
  assert 0 < timing.min_ms <= timing.median_ms and timing.calls_per_repeat >= 1
  with pytest.raises(ValueError, match="repeats"):
    benchlib.time_fn(jax.jit(lambda x: x), jnp.ones(1), repeats=0)


def test_time_rounds_interleaves_the_calls_and_carries_state():
  order, carried = [], [0]

  def counter(name):
    def call():
      order.append(name)
      carried[0] += name == "a"
      return jnp.asarray(carried[0])
    return call

  timings = benchlib.time_rounds({"a": counter("a"), "b": counter("b")}, repeats=2,
                                 calls_per_repeat=3)
  # One untimed first call each, then rounds of three calls of a, then three of b.
  assert order == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2
  assert carried[0] == 7
  for timing in timings.values():
    assert (timing.repeats, timing.calls_per_repeat) == (2, 3)
    assert 0 < timing.min_ms <= timing.median_ms and timing.first_call_s > 0
    assert timing.median_s == timing.median_ms * 1e-3


def test_median_of_odd_and_even_counts():
  assert benchlib.median([3.0, 1.0, 2.0]) == 2.0
  assert benchlib.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_peak_rss_is_at_least_the_resident_set_read_before_it():
  rss = benchlib.rss_bytes()
  assert benchlib.peak_rss_bytes() >= rss > 0


def test_write_json_rejects_nan(tmp_path):
  benchlib.write_json(tmp_path / "a" / "r.json", {"x": 1.5})
  assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"x": 1.5}
  with pytest.raises(ValueError):
    benchlib.write_json(tmp_path / "a" / "r.json", {"x": float("nan")})
  assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]  # Old file kept, no debris.


@pytest.mark.slow
def test_bench_decode_writes_a_complete_record_on_a_tiny_model(tmp_path):
  from experiments import bench_decode
  record = bench_decode.run(bench_decode.Settings(
      models=["tiny"], dtypes=["float32", "no_such_dtype"], batches=[1, 2], decode_tokens=2,
      repeats=1, baseline=False, prefill_prompts=3, prefill_max_lens=[4], prefill_chunk=4,
      memory_lengths=[], memory_model="tiny", memory_dtype="float32",
      weights_dir=str(tmp_path / "w")), out_dir=str(tmp_path), tag="test")
  saved = json.loads((tmp_path / "bench_decode_test.json").read_text())
  assert saved == json.loads(json.dumps(record))
  assert (tmp_path / "bench_decode_test.png").stat().st_size > 0
  assert saved["environment"]["jax"] == jax.__version__ and saved["environment"]["command"]
  ok = [e for e in saved["decode"] if e["status"] == "ok"]
  assert [(e["batch"], e["tokens"]) for e in ok] == [(1, 2), (2, 2)]
  assert all(e["tokens_per_s"] > 0 for e in ok)
  assert [e["status"] for e in saved["decode"] if e["dtype"] == "no_such_dtype"] == ["skipped"]
  (prefill,) = saved["prefill"]
  assert prefill["lengths"][0] == 4 and len(prefill["lengths"]) == 3
  assert prefill["speedup"] > 0 and prefill["batched"]["tokens_per_s"] > 0
  # The memory of one generation, measured in this process.
  path = bench_decode.weights_path("tiny", tmp_path / "w")
  memory = bench_decode.memory_worker(str(path), "float32", 2)
  assert memory["generated"] == 2 and memory["peak_rss_bytes"] > 0


@pytest.mark.slow
def test_bench_finetune_quick_records_every_mode_with_its_trained_and_frozen_sizes(tmp_path):
  import os
  import pathlib
  import subprocess
  import sys

  env = dict(os.environ, RWKV_JAX_CACHE=str(tmp_path / "cache"))  # the random base goes here
  out = tmp_path / "finetune.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_finetune", "--quick", f"--out={out}"],
                 check=True, env=env, cwd=pathlib.Path(__file__).resolve().parents[1],
                 capture_output=True, timeout=600)
  record = json.loads(out.read_text())
  assert out.with_suffix(".png").stat().st_size > 0
  env_record = record["environment"]
  assert env_record["jax"] == jax.__version__ and "--quick" in env_record["command"]
  assert env_record["date_utc"] and env_record["device_kind"]
  by_mode = {x["mode"]: x for x in record["results"]}
  assert sorted(by_mode) == ["full", "lora", "state"]
  assert not any("error" in x for x in by_mode.values())
  full, lora, state = by_mode["full"], by_mode["lora"], by_mode["state"]
  # L2 D64 vocab 256: the whole model trains in full mode and nothing is frozen.
  assert (full["base_dtype"], full["frozen_params"]) == ("float32", 0)
  assert lora["base_dtype"] == state["base_dtype"] == "bfloat16"
  assert lora["frozen_params"] == state["frozen_params"] == full["trained_params"]
  # LoRA r=16 beside the 7 default matrices of each of 2 layers, r * (in + out) each: five of
  # 64 x 64, ffn.key 64 x 256 and ffn.value 256 x 64. State: 4 vectors of 64 per layer.
  assert lora["trained_params"] == 2 * 16 * (5 * 128 + 2 * 320)
  assert state["trained_params"] == 2 * 4 * 64
  for x in by_mode.values():  # Adam's two moments per trained parameter (and its step counts)
    assert 2 <= record["ratios"][f"{x['mode']}_optimizer_bytes_per_trained_byte"] < 2.1
    assert x["peak_rss_bytes"] >= x["peak_rss_after_load_bytes"] > 0
    assert len(x["losses"]) == 2 and all(t > 0 for t in x["step_times_s"])
