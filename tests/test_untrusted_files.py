"""Files from strangers: every reader refuses a malformed one in one line naming it, runs no code
and allocates nothing its header claims before checking the claim against the file.

Each case builds a real damaged file (a cut-short .pth, a safetensors header whose ranges leave the
file, a state file whose header disagrees with its arrays, a binidx index pointing past its .bin,
a vocabulary with a bad line) and pins the exception type and its message. `_refused` also traces
Python and numpy allocations while the reader runs: a reader that sized an array from a header's
claim (10^12 elements) would show it there, or die of a MemoryError, instead of refusing.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import torch
from training_util import (flat_params, one_line_error, random_model, run_module,
                           subprocess_env, write_pth)

from rwkv_jax.config import RWKVConfig
from rwkv_jax.data import binidx
from rwkv_jax.data.tokenizer import load_tokenizer
from rwkv_jax.io import formats, state_file, weights
from rwkv_jax.io.tensor_names import CheckpointError
from rwkv_jax.model import RWKVState

CFG = RWKVConfig(n_layer=1, n_embd=8, vocab_size=16, ctx_len=8)
# What a reader may allocate while refusing a file: far below any claim the tests make.
_ALLOCATION_LIMIT = 8 << 20
HUGE = 10**12  # elements or bytes a damaged header claims


def _refused(error: type[Exception], read, *names) -> str:
  """Runs `read()`, which must raise `error` (no MemoryError) without allocating much; returns
  the message after checking it is one line naming every one of `names`."""
  tracemalloc.start()
  try:
    with pytest.raises(error) as e:
      read()
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < _ALLOCATION_LIMIT, f"{peak} bytes allocated while refusing the file"
  message = str(e.value)
  assert "\n" not in message and "Traceback" not in message and 'File "' not in message, message
  for name in names:
    assert str(name) in message, message
  return message


@pytest.fixture(scope="module")
def model():
  return random_model(CFG, seed=5)


@pytest.fixture(scope="module")
def pth(model, tmp_path_factory):
  return write_pth(model, tmp_path_factory, "model.pth")


@pytest.fixture(scope="module")
def hf_tensors(model, tmp_path_factory):
  """HF name -> array of the model, as model.safetensors holds them."""
  directory = tmp_path_factory.mktemp("hf") / "hf"
  formats.save_hf(model, directory)
  return safetensors.numpy.load_file(directory / formats.HF_WEIGHTS)


def _hf_dir(directory, tensors, shards=1, kind="safetensors"):
  """An HF directory holding `tensors` in one file or in `shards` shards listed by an index."""
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(formats.hf_config_dict(CFG, "float32")))
  if shards == 1:
    safetensors.numpy.save_file(tensors, directory / formats.HF_WEIGHTS)
    return directory
  keys, weight_map = sorted(tensors), {}
  for i in range(shards):
    part = {k: tensors[k] for k in keys[i::shards]}
    if kind == "safetensors":
      name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
      safetensors.numpy.save_file(part, directory / name)
    else:
      name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
      torch.save({k: torch.from_numpy(x) for k, x in part.items()}, directory / name)
    weight_map.update(dict.fromkeys(part, name))
  index = formats.HF_INDEX if kind == "safetensors" else formats.HF_BIN_INDEX
  (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return directory


def _safetensors_bytes(header: dict, data: bytes, header_length: int | None = None) -> bytes:
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw) if header_length is None else header_length) + raw + data


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
  n = struct.unpack("<Q", raw[:8])[0]
  return json.loads(raw[8:8 + n]), raw[8 + n:]


# ----------------------------------------------------------------------------------------------
# 1-2. .pth files.

class _RunsCode:
  """Unpickling this object runs code: it creates the file `marker`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_pth_that_pickles_code_is_refused_without_running_it(tmp_path):
  path, marker = tmp_path / "evil.pth", tmp_path / "ran"
  torch.save({"emb.weight": _RunsCode(marker)}, path)
  message = _refused(CheckpointError, lambda: weights.load(path), path)
  assert "objects other than tensors" in message
  assert not marker.exists()
  # The file does run code when unpickled without weights_only: the check above means something.
  torch.load(path, weights_only=False)
  assert marker.exists()


@pytest.mark.slow
def test_a_pth_cut_in_half_is_refused_as_cut_short(pth, tmp_path):
  path = tmp_path / "half.pth"
  raw = pth.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  message = _refused(CheckpointError, lambda: weights.load(path), path)
  assert "cut short" in message


# ----------------------------------------------------------------------------------------------
# 2-3. safetensors files.

def test_sharded_hf_directories_load_as_the_single_file(hf_tensors, tmp_path):
  one, _ = weights.load(_hf_dir(tmp_path / "one", hf_tensors))
  for kind in ("safetensors", "bin"):
    sharded, _ = weights.load(_hf_dir(tmp_path / kind, hf_tensors, shards=3, kind=kind))
    want, got = flat_params(one), flat_params(sharded)
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{kind} {k}")


def test_a_safetensors_file_cut_in_half_is_refused_as_cut_short(hf_tensors, tmp_path):
  directory = _hf_dir(tmp_path / "hf", hf_tensors)
  path = directory / formats.HF_WEIGHTS
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  message = _refused(CheckpointError, lambda: weights.load(directory), path)
  assert "cut short" in message


def _damage_header(case: str, header: dict, data: bytes) -> bytes:
  names = sorted(k for k in header if k != "__metadata__")
  if case == "range past the end":  # a tensor of 10^12 bytes, its range consistent with its shape
    header[names[0]].update(shape=[HUGE // 4], data_offsets=[0, HUGE])
  elif case == "overlapping ranges":
    size = lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
    a, b = next((a, b) for a in names for b in names if a < b and size(a) == size(b))
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
  elif case == "range not matching the shape":
    header[names[0]]["shape"] = [3]
  elif case == "header length past the end":
    return _safetensors_bytes(header, data, header_length=HUGE)
  elif case == "header not JSON":
    return struct.pack("<Q", 8) + b"{oops!!}" + data
  return _safetensors_bytes(header, data)


@pytest.mark.parametrize("case, expected", [
    ("range past the end", f"takes bytes [0, {HUGE}) of the data, which has only"),
    ("overlapping ranges", "overlap (bytes ["),
    ("range not matching the shape", "needs 12 bytes, but its data_offsets give"),
    ("header length past the end", f"its header length field says {HUGE} bytes, but the file"),
    ("header not JSON", "its header is not JSON"),
])
def test_a_safetensors_header_that_does_not_fit_its_file_is_refused(hf_tensors, tmp_path, case,
                                                                    expected):
  directory = _hf_dir(tmp_path / "hf", hf_tensors)
  path = directory / formats.HF_WEIGHTS
  path.write_bytes(_damage_header(case, *_split_safetensors(path.read_bytes())))
  message = _refused(CheckpointError, lambda: weights.load(directory), path)
  assert expected in message
  assert message.startswith(f"{path} is not a readable safetensors file: ")


# ----------------------------------------------------------------------------------------------
# 4. Index files.

@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("case, expected", [
    ("missing shard", "names the shard SHARD, which is missing from DIR; download every shard"),
    ("shard outside", "names the shard '../SHARD', which is not a file name in its directory"),
    ("tensor not in its shard", "in SHARD, which does not hold them"),
    ("not JSON", "is not a HuggingFace index file: it must be JSON with a 'weight_map'"),
    ("no weight_map", "is not a HuggingFace index file: it must be JSON with a 'weight_map'"),
])
def test_an_index_naming_a_shard_that_is_not_there_is_refused(hf_tensors, tmp_path, kind, case,
                                                              expected):
  directory = _hf_dir(tmp_path / "hf", hf_tensors, shards=2, kind=kind)
  index = directory / (formats.HF_INDEX if kind == "safetensors" else formats.HF_BIN_INDEX)
  weight_map = json.loads(index.read_text())["weight_map"]
  shard = sorted(set(weight_map.values()))[-1]
  if case == "missing shard":
    (directory / shard).unlink()
  elif case == "shard outside":
    (directory / shard).rename(tmp_path / shard)
    weight_map = {k: f"../{v}" if v == shard else v for k, v in weight_map.items()}
  elif case == "tensor not in its shard":
    first = sorted(set(weight_map.values()))[0]
    weight_map[next(k for k, v in weight_map.items() if v == first)] = shard
  if case == "not JSON":
    index.write_text("{'weight_map': ")
  elif case == "no weight_map":
    index.write_text(json.dumps({"metadata": {}}))
  else:
    index.write_text(json.dumps({"weight_map": weight_map}))
  message = _refused(CheckpointError, lambda: weights.load(directory), index)
  assert expected.replace("SHARD", shard).replace("DIR", str(directory)) in message


# ----------------------------------------------------------------------------------------------
# 5. State files.

def _state_file(path, batch=1):
  l, c, v = CFG.n_layer, CFG.n_embd, CFG.vocab_size
  rng = np.random.default_rng(0)
  state = RWKVState(*(rng.normal(size=(l, batch, c)).astype(np.float32) for _ in range(5)))
  return state_file.save(path, state_file.SavedState.of(
      CFG, state, np.zeros((batch, v), np.float32), 3))


def _npy(shape, data=b"") -> bytes:
  """A .npy of float32 `shape` whose data is only `data` (a header may claim what is not there)."""
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                             "shape": shape})
  return buf.getvalue() + data


def _rewrite(src, dst, **members):
  """A copy of the ZIP `src` with members replaced: name (dots as underscores) -> bytes or a
  function of the old bytes."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for info in zin.infolist():
      data = zin.read(info.filename)
      new = members.get(info.filename.replace(".", "_"), data)
      zout.writestr(info.filename, new(data) if callable(new) else new)
  return dst


def _header(**changes):
  return lambda data: json.dumps({**json.loads(data), **changes})


@pytest.mark.parametrize("case, members, expected", [
    ("n_layer", {"header_json": _header(n_layer=2)},
     "att_x_prev is float32 (1, 1, 8), expected float32 (2, 1, 8) by its header"),
    ("n_embd", {"header_json": _header(n_embd=4, dim_att=4)},
     "att_x_prev is float32 (1, 1, 8), expected float32 (1, 1, 4) by its header"),
    ("batch", {"header_json": _header(batch=2, tokens_consumed=[3, 3])},
     "att_x_prev is float32 (1, 1, 8), expected float32 (1, 2, 8) by its header"),
    ("tokens_consumed", {"header_json": _header(tokens_consumed=[3, 3])},
     "tokens_consumed [3, 3] does not give a count >= 0 for each of its 1 sequences"),
    ("n_layer not a number", {"header_json": _header(n_layer="1")},
     "its header's n_layer is '1', not a whole number >= 1"),
    ("header claims 10^12 floats", {"header_json": _header(n_embd=HUGE)},
     "its header describes 8000000000160 bytes of arrays (n_layer=1, n_embd=1000000000000"),
    ("array claims 10^12 floats", {"num_npy": _npy((HUGE,))},
     f"num is float32 ({HUGE},), expected float32 (1, 1, 8) by its header"),
    ("array shorter than its header", {"num_npy": _npy((1, 1, 8), b"\0" * 16)},
     "num.npy holds 16 bytes of data, but float32 (1, 1, 8) is 32"),
    ("array of objects", {"num_npy": lambda d: d.replace(b"'<f4'", b"'|O' ")},
     "num is object (1, 1, 8), expected float32 (1, 1, 8)"),
])
def test_a_state_file_whose_header_disagrees_with_its_arrays_is_refused(tmp_path, case, members,
                                                                       expected):
  path = _rewrite(_state_file(tmp_path / "good.state"), tmp_path / "bad.state", **members)
  message = _refused(CheckpointError, lambda: state_file.load(path, config=CFG), path)
  assert expected in message


def test_a_truncated_state_file_is_refused_as_cut_short(tmp_path):
  good = _state_file(tmp_path / "good.state").read_bytes()
  for name, data in {"half": good[:len(good) // 2], "last byte": good[:-1]}.items():
    path = tmp_path / f"{name.replace(' ', '_')}.state"
    path.write_bytes(data)
    message = _refused(state_file.StateFileError, lambda: state_file.load(path), path)
    assert "is damaged, cut short or not a state file (BadZipFile" in message


def test_a_good_state_file_still_loads(tmp_path):
  saved = state_file.load(_state_file(tmp_path / "good.state", batch=2), config=CFG)
  assert saved.batch == 2 and saved.tokens_consumed == (3, 3)


# ----------------------------------------------------------------------------------------------
# 6. Binidx pairs.

def _binidx(tmp_path, *, sizes=None, pointers=None, magic=None, version=None, num_seq=None,
            num_docs=None):
  """A pair of two documents (uint16, 10 and 5 tokens) whose .idx has the fields given changed."""
  _, idx = binidx.write_binidx(tmp_path / "data", [np.arange(10), np.arange(5)])
  raw = idx.read_bytes()
  header = list(binidx._HEADER.unpack_from(raw))
  n, d = header[3], header[4]
  at = binidx._HEADER.size
  good_sizes = np.frombuffer(raw, np.int32, n, at)
  good_pointers = np.frombuffer(raw, np.int64, n, at + 4 * n)
  for i, value in enumerate((magic, version, None, num_seq, num_docs)):
    if value is not None:
      header[i] = value
  idx.write_bytes(binidx._HEADER.pack(*header)
                  + np.asarray(good_sizes if sizes is None else sizes, np.int32).tobytes()
                  + np.asarray(good_pointers if pointers is None else pointers, np.int64).tobytes()
                  + raw[at + 12 * n:])
  return tmp_path / "data"


@pytest.mark.parametrize("fields, expected", [
    ({"pointers": [0, HUGE]}, f"sequence 1 points to byte {HUGE} of BIN (30 bytes), where the "
                              f"sizes before it put it at byte 20"),
    ({"sizes": [10, 2**31 - 1]}, "describes 4294967314 bytes of uint16 tokens but BIN has 30"),
    ({"sizes": [10, -5]}, "sequence 1 has size -5 < 0"),
    ({"magic": b"NOTMMIDX!"}, "does not start with b'MMIDIDX\\x00\\x00' (got b'NOTMMIDX!')"),
    ({"version": 2}, "has version 2; only version 1 is supported"),
    ({"num_seq": HUGE}, f"but its header promises {HUGE} sequences and 3 documents"),
    ({"num_docs": 2**64 - 1}, f"promises 2 sequences and {2**64 - 1} documents"),
])
def test_a_binidx_index_that_does_not_fit_its_files_is_refused(tmp_path, fields, expected):
  prefix = _binidx(tmp_path, **fields)
  bin_path, idx_path = binidx.binidx_paths(prefix)
  message = _refused(ValueError, lambda: binidx.BinidxSource(prefix), idx_path)
  assert expected.replace("BIN", str(bin_path)) in message


def test_a_binidx_bin_cut_short_is_refused(tmp_path):
  prefix = _binidx(tmp_path)
  bin_path, idx_path = binidx.binidx_paths(prefix)
  bin_path.write_bytes(bin_path.read_bytes()[:7])
  message = _refused(ValueError, lambda: binidx.BinidxSource(prefix), bin_path, idx_path)
  assert f"describes 30 bytes of uint16 tokens but {bin_path} has 7 bytes" in message


# ----------------------------------------------------------------------------------------------
# 7. Tokenizer files.

@pytest.mark.parametrize("name, content, expected", [
    ("random.json", bytes(range(256)) * 4, "is not a `tokenizers` JSON file (stream did not"),
    ("not_a_tokenizer.json", b'{"hello": ["world"]}', "is not a `tokenizers` JSON file ("),
    ("list.json", b"[1, 2, 3]", "is not a `tokenizers` JSON file (invalid type: sequence"),
    ("random.txt", bytes(range(128, 256)) * 4, ":1: byte 0 of the line is not UTF-8"),
])
def test_a_file_that_is_not_a_tokenizer_is_refused_naming_it(tmp_path, name, content, expected):
  path = tmp_path / name
  path.write_bytes(content)
  assert expected in _refused(ValueError, lambda: load_tokenizer(path), path)


def _world_vocab(path, extra_line: str):
  lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
  path.write_text("\n".join([*lines, extra_line]) + "\n")
  return path


@pytest.mark.parametrize("line, expected", [
    ("300 'ab'", ":257: expected `id repr(token) byte_length`, got \"300 'ab'\""),
    ("300 __import__('os').getcwd() 2", ":257: expected `id repr(token) byte_length`"),
    ("300 " + "-" * 100_000 + "1 2", ":257: expected `id repr(token) byte_length`"),
    ("300 'abc' 2", ":257: token b'abc' does not have 2 bytes"),
    (f"{HUGE} 'ab' 2", f":257: id {HUGE} is repeated or not in [1, 16777216)"),
    ("x 'ab' 2", ":257: expected `id repr(token) byte_length`, got \"x 'ab' 2\""),
])
def test_a_world_vocabulary_with_a_malformed_line_is_refused_naming_the_line(tmp_path, line,
                                                                             expected):
  path = _world_vocab(tmp_path / "vocab.txt", line)
  assert expected in _refused(ValueError, lambda: load_tokenizer(path), path)


def test_a_good_world_vocabulary_still_loads(tmp_path):
  tok = load_tokenizer(_world_vocab(tmp_path / "vocab.txt", "300 'ab' 2"))
  assert tok.encode("abc") == [300, ord("c") + 1]


# ----------------------------------------------------------------------------------------------
# Through the command line: one `error:` line naming the file, status 2, no traceback.

@pytest.fixture(scope="module")
def byte_pth(tmp_path_factory):
  """A checkpoint of a byte-level model, so that --tokenizer=bytes fits it."""
  path = tmp_path_factory.mktemp("cli") / "bytes.pth"
  formats.save_pth(random_model(CFG.replace(vocab_size=256)), path)
  return path


def _run(module: str, *flags: str):
  return run_module([sys.executable, "-m", f"experiments.{module}", *flags],
                    subprocess_env(devices=1))


@pytest.mark.slow
def test_score_refuses_a_cut_short_checkpoint_in_one_line(byte_pth, tmp_path):
  path = tmp_path / "half.pth"
  path.write_bytes(byte_pth.read_bytes()[:byte_pth.stat().st_size // 2])
  line = one_line_error(_run("score", f"--checkpoint={path}", "--tokens=1,2"), 2)
  assert str(path) in line and "cut short" in line


@pytest.mark.slow
def test_generate_refuses_a_state_file_whose_header_disagrees_with_its_arrays(byte_pth,
                                                                              tmp_path):
  cfg = CFG.replace(vocab_size=256)
  state = RWKVState(*(np.zeros((1, 1, 8), np.float32) for _ in range(5)))
  good = state_file.save(tmp_path / "good.state", state_file.SavedState.of(
      cfg, state, np.zeros((1, 256), np.float32), 1))
  bad = _rewrite(good, tmp_path / "bad.state", header_json=_header(batch=2,
                                                                   tokens_consumed=[1, 1]))
  line = one_line_error(_run("generate", f"--checkpoint={byte_pth}", f"--load_state={bad}",
                             "--tokenizer=bytes", "--max_tokens=1"), 2)
  assert line.startswith(f"error: --load_state: {bad}: att_x_prev is float32 (1, 1, 8), "
                         f"expected float32 (1, 2, 8)")


@pytest.mark.slow
def test_generate_refuses_a_tokenizer_file_that_is_not_one(byte_pth, tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
  line = one_line_error(_run("generate", f"--checkpoint={byte_pth}", f"--tokenizer={path}",
                             "--prompt=hi"), 2)
  assert line.startswith(f"error: --tokenizer: {path} is not a `tokenizers` JSON file")
