"""A runner's first run: each program holding the model is compiled once and no program the
command does not run; the compilation cache is on by default and changes no result; a .pth file
loads without torch into one copy of the weights; bench_coldstart writes its record.

The runners run in subprocesses with JAX's compile log on, read by `benchlib.compiled_programs`.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from training_util import REPO, tiny_config, write_config_file, write_corpus

from experiments import benchlib, reference_models
from rwkv_jax.io import formats, weights

# A model whose ffn.key kernel [C, F] has a shape no other array has: a program with that shape
# among its inputs holds the model, once per L times it occurs.
L, C, F, V = 2, 40, 136, 300
MARKER = f"float32[{C},{F}]"
PROMPT = ",".join(str(i) for i in range(1, 21))
TEXT = "The river runs north of the city, and the king's music was known in early years. " * 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
  import torch  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("checkpoint") / "model.pth"
  torch.save(reference_models.official_state_dict(0, n_layer=L, n_embd=C, dim_att=C, dim_ffn=F,
                                                  vocab=V), path)
  return path


def _run(args: list[str], cache: str | None, marker: str = MARKER, n_layer: int = L,
         **env_vars: str):
  """Runs `python -m args` with the compile log on; cache None leaves the default cache on."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", **env_vars)
  env.pop("RWKV_JAX_COMPILE_CACHE", None)
  if cache is not None:
    env["RWKV_JAX_COMPILE_CACHE"] = cache
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, benchlib.compiled_programs(proc.stderr, marker, n_layer)


def _generate(checkpoint: pathlib.Path, out: pathlib.Path, cache: str | None, **env_vars):
  # 20 prompt tokens in chunks of 8 (the last one ragged), then 40 tokens streamed one per call.
  _, found = _run(["experiments.generate", f"--checkpoint={checkpoint}", "--tokenizer=bytes",
                   f"--prompt_tokens={PROMPT}", "--prefill_chunk=8", "--max_tokens=40",
                   "--temperature=0", "--nostop_at_eos", f"--output={out}"], cache, **env_vars)
  return json.loads(out.read_text()), found


def _score(checkpoint: pathlib.Path, out: pathlib.Path, cache: str | None, **env_vars):
  _, found = _run(["experiments.score", f"--checkpoint={checkpoint}", f"--tokens={PROMPT}",
                   "--chunk=8", f"--output={out}"], cache, **env_vars)
  return np.load(out), found


@pytest.mark.slow
def test_generate_compiles_one_prefill_and_one_decode_program(checkpoint, tmp_path):
  _, found = _generate(checkpoint, tmp_path / "tokens.json", "0")
  # Neither a second prefill for the ragged chunk nor a logits-returning decode; compiled ahead
  # of time while the weights load, and not again when run.
  assert found["model"] == {"_run_chunk": [1], "decode_block": [1]}, found
  assert found["loaded"] == 0
  # Nor any small program on the way (zeros, a key, a slice): arrays are made on the host.
  assert found["names"] == {"_run_chunk": 1, "decode_block": 1}, found


@pytest.mark.slow
def test_score_compiles_one_chunk_program(checkpoint, tmp_path):
  _, found = _run(["experiments.score", f"--checkpoint={checkpoint}", "--tokenizer=bytes",
                   f"--text={TEXT}", "--chunk=16"], "0")
  assert found["model"] == {"_run_chunk": [1]}, found


@pytest.mark.slow
def test_train_compiles_its_step_and_its_eval_step_once(tmp_path):
  config = tiny_config(write_corpus(tmp_path / "corpus.txt", 20_000), steps=3, eval_every=3,
                       checkpoint_every=3)
  config.mesh.update(data=1)
  n_embd = config.model.n_embd
  _, found = _run(["experiments.train", f"--config={write_config_file(tmp_path / 'c.py', config)}",
                   f"--workdir={tmp_path / 'run'}"], "0",
                  marker=f"float32[{n_embd},{4 * n_embd}]", n_layer=config.model.n_layer)
  # The train step takes the parameters and Adam's two moments; the eval step the parameters;
  # the optimizer's init (optax's init_fn) reads the parameters once. Three steps, one program.
  assert sorted(found["model"]["step"]) == [1, 3], found
  assert set(found["model"]) <= {"step", "init_fn"}, found


@pytest.mark.slow
def test_the_compilation_cache_is_on_by_default_and_changes_no_tokens(checkpoint, tmp_path):
  cache = {"RWKV_JAX_CACHE": str(tmp_path / "cache")}
  off, _ = _generate(checkpoint, tmp_path / "off.json", "0")
  cold, cold_found = _generate(checkpoint, tmp_path / "cold.json", None, **cache)
  written = " ".join(p.name for p in (tmp_path / "cache" / "xla").iterdir())
  assert "jit__run_chunk" in written and "jit_decode_block" in written
  warm, warm_found = _generate(checkpoint, tmp_path / "warm.json", None, **cache)
  assert cold == warm == off
  assert cold_found["loaded"] == 0
  assert {"jit__run_chunk", "jit_decode_block"} <= set(warm_found["loaded_names"]), warm_found


@pytest.mark.slow
def test_the_compilation_cache_changes_no_scores(checkpoint, tmp_path):
  directory = str(tmp_path / "xla")
  off, _ = _score(checkpoint, tmp_path / "off.npy", "0")
  cold, _ = _score(checkpoint, tmp_path / "cold.npy", directory)
  warm, warm_found = _score(checkpoint, tmp_path / "warm.npy", directory)
  assert "jit__run_chunk" in warm_found["loaded_names"], warm_found
  np.testing.assert_array_equal(cold, off)
  np.testing.assert_array_equal(warm, off)


def _state_dict(dtype: str):
  import torch  # pylint: disable=g-import-not-at-top
  sd = reference_models.official_state_dict(3, n_layer=L, n_embd=C, dim_att=C, dim_ffn=F,
                                            vocab=V)
  return {k: v.to(getattr(torch, dtype)) for k, v in sd.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_pth_file_is_read_without_torch_as_torch_reads_it(tmp_path, dtype):
  import torch  # pylint: disable=g-import-not-at-top
  sd = _state_dict(dtype)
  torch.save(sd, tmp_path / "m.pth")
  refs = formats.read_state_dict_zip(tmp_path / "m.pth")
  assert set(refs) == set(sd)
  for name, tensor in sd.items():
    np.testing.assert_array_equal(refs[name].read(), formats.torch_to_numpy(tensor), err_msg=name)
  # The model is the one torch.load's tensors give, in every precision.
  model, _ = weights.load(tmp_path / "m.pth", dtype="float32")
  expected, _ = weights._build("torch", {k: tuple(v.shape) for k, v in sd.items()},
                               {k: dtype for k in sd},
                               lambda name: formats.torch_to_numpy(sd[name]), None, "float32")
  for (path, got), (_, want) in zip(sorted(_flat(model).items()),
                                    sorted(_flat(expected).items())):
    np.testing.assert_array_equal(got, want, err_msg=str(path))


def _flat(model) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_a_wrapped_state_dict_is_read_and_a_strided_tensor_goes_to_torch(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  sd = _state_dict("float32")
  torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
  wrapped = formats.read_state_dict_zip(tmp_path / "wrapped.pth")
  assert wrapped["epoch"] == 3 and set(wrapped["state_dict"]) == set(sd)
  # A transposed view is stored with its strides: torch.load reads such a file.
  strided = dict(sd, **{"head.weight": sd["head.weight"].T.contiguous().T})
  torch.save(strided, tmp_path / "strided.pth")
  assert formats.read_state_dict_zip(tmp_path / "strided.pth") is None
  for name in ("wrapped.pth", "strided.pth"):
    model, _ = weights.load(tmp_path / name)
    np.testing.assert_array_equal(_flat(model)[("head", "kernel")], sd["head.weight"].numpy().T)


# Loads a checkpoint in a fresh process: whether torch was imported, and the resident memory
# after the imports, at its peak while loading, and after.
_LOAD = """
import json, sys
from experiments import benchlib
from rwkv_jax.io import weights
base = benchlib.rss_bytes()
benchlib.reset_peak_rss()
model, _ = weights.load(sys.argv[1])
print(json.dumps({"torch": "torch" in sys.modules, "base": base,
                  "peak": benchlib.peak_rss_bytes(), "after": benchlib.rss_bytes()}))
"""


@pytest.mark.slow
def test_loading_a_pth_file_imports_no_torch_and_holds_the_weights_once(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  # Layers of 13 MB, no tensor over 4 MB: one copy of the weights plus one tensor in flight.
  sd = reference_models.official_state_dict(0, n_layer=8, n_embd=512, dim_att=512,
                                            dim_ffn=2048, vocab=1000)
  torch.save(sd, tmp_path / "m.pth")
  nbytes = sum(t.numel() * 4 for t in sd.values())
  proc = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "m.pth")], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.splitlines()[-1])
  assert not got["torch"]
  # The weights, one tensor in flight and the abstract model's tracing (a few tens of MB). The
  # file's memory map kept resident, a cast or transposed copy of the whole, or the model built
  # with random values before being filled would each add another copy.
  assert got["peak"] - got["base"] < nbytes + (40 << 20), (got, nbytes)


@pytest.mark.slow
def test_bench_coldstart_quick_writes_cold_warm_and_package_runs(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_coldstart", "--quick",
                         "--jobs=generate", f"--out={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  assert {"device_kind", "jax", "date_utc", "command"} <= set(record["environment"])
  (job,) = record["jobs"]
  assert job["name"].startswith("generate_")
  for kind in ("cold", "warm", "package"):
    (run,) = job["runs"][kind]
    assert run["returncode"] == 0 and run["wall_s"] > 0 and run["peak_rss_bytes"] > 0
  assert job["runs"]["cold"][0]["programs"]["model"] == {"_run_chunk": [1], "decode_block": [1]}
  assert job["runs"]["warm"][0]["programs"]["loaded"] >= 2  # prefill and decode, from the cache
  assert len(job["runs"]["package"][0]["result"]["tokens"]) == record["new_tokens"]
  assert len(job["runs"]["cold"][0]["result"]["tokens"]) == record["new_tokens"]
  assert isinstance(job["summary"]["same_tokens_as_package"], bool)
  assert {"cold_wall_over_package", "warm_wall_over_package", "peak_rss_over_package"} <= set(
      job["summary"])
  assert out.with_suffix(".png").stat().st_size > 0


def test_run_process_measures_each_process_alone():
  big = benchlib.run_process([sys.executable, "-c", "b = b'x' * (300 << 20); print(len(b))"])
  small = benchlib.run_process([sys.executable, "-c", "print('small')"])
  assert big.returncode == small.returncode == 0 and small.stdout == "small\n"
  # The small one's own peak, not the largest of every child so far.
  assert big.peak_rss_bytes > 300 << 20 > small.peak_rss_bytes
  assert big.wall_s > 0 and small.wall_s > 0
  killed = benchlib.run_process([sys.executable, "-c", "import time; time.sleep(60)"],
                                timeout_s=1)
  assert killed.returncode < 0 and killed.wall_s < 30


def test_background_compilations_can_be_waited_for_one_by_one():
  import threading  # pylint: disable=g-import-not-at-top
  from rwkv_jax import compile_cache  # pylint: disable=g-import-not-at-top

  ran, release = [], threading.Event()

  def second():
    assert release.wait(60)
    ran.append(2)

  def failing():
    raise RuntimeError("a compilation that fails costs only time")

  background = compile_cache.ahead_of_time([lambda: ran.append(1), second, failing])
  background.wait(1)
  assert ran == [1]  # the second is still blocked
  release.set()
  background.wait()
  assert ran == [1, 2]
  background.wait(5)  # more than there are: all of them


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_compiled_ahead_of_time_generate_compiles_nothing_more(temperature):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax._src import monitoring  # pylint: disable=g-import-not-at-top
  from rwkv_jax import compile_cache, model as model_lib  # pylint: disable=g-import-not-at-top
  from rwkv_jax.config import RWKVConfig  # pylint: disable=g-import-not-at-top
  from rwkv_jax.infer import sampling  # pylint: disable=g-import-not-at-top

  config = RWKVConfig(n_layer=2, n_embd=24, vocab_size=50)
  settings = sampling.SamplingConfig(temperature=temperature, top_p=0.9, stop_tokens=(3,))
  prompts = [[1, 2, 3, 4, 5]] * 2
  model = model_lib.RWKV(config, rngs=nnx.Rngs(0))
  compile_cache.ahead_of_time(sampling.compile_generate(
      config, 2, 5, 7, prefill_chunk=8, sampling=settings)).wait()
  compiled = []

  def listen(event, unused_duration, **unused_kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  monitoring.register_event_duration_secs_listener(listen)
  try:
    got = sampling.generate(model, prompts, 7, sampling.seed_key(1), sampling=settings,
                            prefill_chunk=8)
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert not compiled, compiled
  want = sampling.generate(model, prompts, 7, jax.random.key(1), sampling=settings,
                           prefill_chunk=8)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_host_made_keys_and_states_are_jax_own():
  import jax  # pylint: disable=g-import-not-at-top
  from rwkv_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from rwkv_jax.config import RWKVConfig  # pylint: disable=g-import-not-at-top
  from rwkv_jax.infer import chunks, sampling  # pylint: disable=g-import-not-at-top

  for seed in (0, 1, 12345, 2**31 - 1, -1, 2**33):
    if seed >= 2**31 and not jax.config.jax_enable_x64:
      continue
    got, want = sampling.seed_key(seed), jax.random.key(seed)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
  config = RWKVConfig(n_layer=3, n_embd=16, vocab_size=20, dim_att=8)
  for got, want in zip(chunks.empty_state(config, 2), model_lib.empty_state(config, 2)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_load_tells_the_config_before_reading_the_weights(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  torch.save(_state_dict("bfloat16"), tmp_path / "m.pth")
  told = []
  _, config = weights.load(tmp_path / "m.pth", dtype="float32", on_config=told.append)
  assert told == [config] and config.param_dtype == "float32"
