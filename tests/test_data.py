"""Tests for rwkv_jax.data.binidx (the format), rwkv_jax.data (sources, grain pipeline) and corpus."""

import bz2
import json
import os
import pathlib
import struct
import subprocess
import sys
import zipfile

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from rwkv_jax.data import binidx, corpus
from rwkv_jax.data import encode as data_encode
from rwkv_jax.data import pipeline as data_pipeline
from rwkv_jax.data import sources as data_sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def _stream_file(tmp_path, n, dtype=np.uint16):
  """A binidx whose stream is 0, 1, ..., n-1: every token names its own position."""
  prefix = tmp_path / "stream"
  tokens = np.arange(n)
  binidx.write_binidx(prefix, [tokens[: n // 3], tokens[n // 3:]], dtype=dtype)
  return binidx.BinidxSource(prefix)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["targets"], y["targets"])


class ByteTokenizer:
  vocab_size = 256

  def encode(self, text):
    return list(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# binidx


def test_binidx_round_trip_reads_documents_back_exactly(tmp_path):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 50277, size=int(s)) for s in (5, 0, 17, 1, 300)]
  bin_path, idx_path = binidx.write_binidx(tmp_path / "ds", docs, dtype=np.uint16)
  assert (bin_path.name, idx_path.name) == ("ds.bin", "ds.idx")
  src = binidx.BinidxSource(tmp_path / "ds")
  assert src.dtype == np.uint16 and isinstance(src.tokens, np.memmap)
  assert src.num_sequences == len(docs)
  for i, doc in enumerate(docs):
    np.testing.assert_array_equal(src.sequence(i), doc)
  np.testing.assert_array_equal(src.tokens, np.concatenate(docs))
  np.testing.assert_array_equal(src.doc_idx, np.arange(len(docs) + 1))
  # The .bin and .idx suffixes name the same pair.
  np.testing.assert_array_equal(binidx.BinidxSource(bin_path).tokens, src.tokens)
  np.testing.assert_array_equal(data_sources.open_source(idx_path).tokens, src.tokens)


def test_binidx_files_follow_the_megatron_layout(tmp_path):
  # Built by hand from the format description, independently of write_binidx.
  docs = [np.array([7, 8, 9]), np.array([65535, 1])]
  expected_idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                  + struct.pack("<QQ", 2, 3) + np.array([3, 2], np.int32).tobytes()
                  + np.array([0, 6], np.int64).tobytes() + np.array([0, 1, 2], np.int64).tobytes())
  bin_path, idx_path = binidx.write_binidx(tmp_path / "ds", docs, dtype=np.uint16)
  assert idx_path.read_bytes() == expected_idx
  assert bin_path.read_bytes() == np.array([7, 8, 9, 65535, 1], "<u2").tobytes()


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_binidx_round_trip_in_other_dtypes(tmp_path, dtype):
  docs = [np.array([1, 2, 3]), np.array([255, 0])]
  binidx.write_binidx(tmp_path / "ds", docs, dtype=dtype)
  src = binidx.BinidxSource(tmp_path / "ds")
  assert src.dtype == dtype
  np.testing.assert_array_equal(src.tokens, [1, 2, 3, 255, 0])


def test_binidx_mismatched_pair_names_both_files(tmp_path):
  binidx.write_binidx(tmp_path / "a", [np.arange(100)])
  binidx.write_binidx(tmp_path / "b", [np.arange(60)])
  (tmp_path / "a.bin").write_bytes((tmp_path / "b.bin").read_bytes())
  with pytest.raises(ValueError, match="does not match") as e:
    binidx.BinidxSource(tmp_path / "a")
  assert str(tmp_path / "a.bin") in str(e.value) and str(tmp_path / "a.idx") in str(e.value)


def test_binidx_truncated_index_is_reported(tmp_path):
  _, idx_path = binidx.write_binidx(tmp_path / "a", [np.arange(10), np.arange(5)])
  idx_path.write_bytes(idx_path.read_bytes()[:-8])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    binidx.BinidxSource(tmp_path / "a")


def test_binidx_wrong_magic_is_reported(tmp_path):
  _, idx_path = binidx.write_binidx(tmp_path / "a", [np.arange(10)])
  idx_path.write_bytes(b"NOTANIDX!" + idx_path.read_bytes()[9:])
  with pytest.raises(ValueError, match="not a Megatron mmap binidx index"):
    binidx.BinidxSource(tmp_path / "a")


def test_binidx_inconsistent_pointers_are_reported(tmp_path):
  _, idx_path = binidx.write_binidx(tmp_path / "a", [np.arange(10), np.arange(5)])
  raw = bytearray(idx_path.read_bytes())
  pointer_1 = 34 + 2 * 4 + 8  # header, sizes, first pointer
  raw[pointer_1:pointer_1 + 8] = struct.pack("<q", 4)
  idx_path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="pointers do not match"):
    binidx.BinidxSource(tmp_path / "a")


def test_binidx_missing_file_is_reported(tmp_path):
  binidx.write_binidx(tmp_path / "a", [np.arange(10)])
  (tmp_path / "a.idx").unlink()
  with pytest.raises(FileNotFoundError, match=r"a\.idx does not exist"):
    binidx.BinidxSource(tmp_path / "a")


def test_write_binidx_rejects_tokens_that_do_not_fit_the_dtype(tmp_path):
  with pytest.raises(ValueError, match=r"outside uint16.*dtype=np.int32"):
    binidx.write_binidx(tmp_path / "a", [np.array([1, 70000])], dtype=np.uint16)
  assert not list(tmp_path.iterdir()), "a failed write must leave no files behind"


# ---------------------------------------------------------------------------------------------
# Text -> binidx


def test_encode_text_file_makes_one_document_per_paragraph(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("first line\nsame para\n\n\nsecond\n\nthird é\n", encoding="utf-8")
  src = data_encode.encode_text_file(text, ByteTokenizer(), tmp_path / "out")
  assert src.dtype == np.uint16
  got = [bytes(src.sequence(i)[:-1].astype(np.uint8)).decode() for i in range(src.num_sequences)]
  assert got == ["first line\nsame para", "second", "third é"]
  assert all(src.sequence(i)[-1] == data_encode.END_OF_DOCUMENT for i in range(src.num_sequences))


def test_encode_text_file_line_mode_without_end_of_document(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("a\nbc\n\nd\n")
  src = data_encode.encode_text_file(text, ByteTokenizer(), tmp_path / "out", split="line",
                              end_of_document=None)
  np.testing.assert_array_equal(src.tokens, list(b"abcd"))
  np.testing.assert_array_equal(src.sizes, [1, 2, 1])


def test_encode_text_file_rejects_vocab_larger_than_dtype(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("hello\n")
  big = ByteTokenizer()
  big.vocab_size = 70000
  with pytest.raises(ValueError, match=r"vocab_size 70000 does not fit in uint16"):
    data_encode.encode_text_file(text, big, tmp_path / "out", dtype=np.uint16)
  # Left unset, the dtype widens to hold the vocabulary.
  assert data_encode.encode_text_file(text, big, tmp_path / "out").dtype == np.int32


def test_make_binidx_script_writes_a_readable_pair(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("one\n\ntwo\n")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.make_binidx", f"--input={text}",
       f"--output_prefix={tmp_path / 'out'}", "--tokenizer=bytes"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  src = binidx.BinidxSource(tmp_path / "out")
  np.testing.assert_array_equal(src.tokens, list(b"one\x00two\x00"))


# ---------------------------------------------------------------------------------------------
# Byte sources


def test_byte_source_memory_maps_a_file(tmp_path):
  path = tmp_path / "f.txt"
  path.write_bytes(b"hello world")
  src = data_sources.ByteSource(path)
  assert isinstance(src.tokens, np.memmap) and src.tokens.dtype == np.uint8
  assert bytes(src.tokens) == b"hello world" and src.vocab_size == 256


def test_byte_source_joins_a_directory_in_sorted_order(tmp_path):
  (tmp_path / "b.txt").write_bytes(b"BB")
  (tmp_path / "a.txt").write_bytes(b"A")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.txt").write_bytes(b"C")
  (tmp_path / ".hidden").write_bytes(b"no")
  assert bytes(data_sources.ByteSource(tmp_path).tokens) == b"A\nBB\nC"


def test_byte_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data_sources.ByteSource(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="is empty"):
    data_sources.ByteSource(tmp_path / "empty.txt")
  (tmp_path / "d").mkdir()
  with pytest.raises(ValueError, match="holds no files"):
    data_sources.ByteSource(tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# The pipeline


def test_windows_are_shifted_slices_of_the_stream(tmp_path):
  src = _stream_file(tmp_path, 3000)
  it = iter(data_pipeline.make_dataset(src, ctx_len=16, batch_size=4, seed=0))
  for batch in _take(it, 5):
    assert batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == np.int32
    assert batch["targets"].shape == (4, 16) and batch["targets"].dtype == np.int32
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
      start = inputs[0]
      np.testing.assert_array_equal(inputs, np.asarray(src.tokens[start:start + 16]))
      np.testing.assert_array_equal(targets, np.asarray(src.tokens[start + 1:start + 17]))


def test_windows_from_a_text_file_match_its_bytes(tmp_path):
  path = tmp_path / "f.txt"
  text = bytes(range(256)) * 4
  path.write_bytes(text)
  batch = next(iter(data_pipeline.make_dataset(data_sources.ByteSource(path), ctx_len=8, batch_size=2, seed=3,
                                      val_fraction=0.0)))
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    start = text.index(bytes(inputs.astype(np.uint8)))
    assert bytes(targets.astype(np.uint8)) == text[start + 1:start + 9]


def test_same_seed_same_order_other_seed_other_order(tmp_path):
  src = _stream_file(tmp_path, 3000)
  make = lambda seed: _take(iter(data_pipeline.make_dataset(src, 16, 4, seed=seed)), 4)
  _assert_batches_equal(make(7), make(7))
  assert not np.array_equal(make(7)[0]["inputs"], make(8)[0]["inputs"])


def test_training_epoch_visits_every_start_once_then_reshuffles(tmp_path):
  n, t, b = 200, 8, 4
  tokens = np.arange(n, dtype=np.int32)
  split = data_pipeline.split_stream(n, t, 0.1)
  num_starts = split.num_train_windows
  assert num_starts % b == 0  # 180 - 8 = 172 windows, 43 batches
  it = iter(data_pipeline.make_dataset(tokens, t, b, seed=0, val_fraction=0.1))
  epoch1 = np.concatenate([x["inputs"][:, 0] for x in _take(it, num_starts // b)])
  epoch2 = np.concatenate([x["inputs"][:, 0] for x in _take(it, num_starts // b)])
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(num_starts))
  np.testing.assert_array_equal(np.sort(epoch2), np.arange(num_starts))
  assert not np.array_equal(epoch1, epoch2)


def test_train_and_val_windows_never_share_a_token(tmp_path):
  n, t, b = 400, 8, 2
  tokens = np.arange(n, dtype=np.int32)  # token value == position
  split = data_pipeline.split_stream(n, t, 0.25)
  train_it = iter(data_pipeline.make_dataset(tokens, t, b, seed=1, val_fraction=0.25))
  train_pos = np.concatenate(
      [np.concatenate([x["inputs"], x["targets"]], 1).ravel()
       for x in _take(train_it, split.num_train_windows // b)])
  val = list(data_pipeline.make_dataset(tokens, t, b, seed=1, split="val", val_fraction=0.25))
  val_pos = np.concatenate([np.concatenate([x["inputs"], x["targets"]], 1).ravel() for x in val])
  assert train_pos.max() < split.train_end == 300 <= val_pos.min()
  assert set(train_pos) == set(range(300))  # the whole training part is used


def test_validation_is_finite_in_order_and_targets_every_token_once():
  n, t, b = 300, 10, 3
  tokens = np.arange(n, dtype=np.int32)
  ds = data_pipeline.make_dataset(tokens, t, b, seed=0, split="val", val_fraction=0.32)
  batches = list(ds)
  assert len(batches) == 3  # 96 tokens -> 9 windows -> 3 batches of 3
  targets = np.concatenate([x["targets"] for x in batches]).ravel()
  np.testing.assert_array_equal(targets, np.arange(205, 295))
  _assert_batches_equal(batches, list(ds))  # a second pass repeats the first


def test_resumed_iterator_yields_the_same_batches(tmp_path):
  src = _stream_file(tmp_path, 5000)
  make = lambda: iter(data_pipeline.make_dataset(src, 16, 4, seed=5))
  uninterrupted = make()
  _take(uninterrupted, 3)
  state = json.loads(json.dumps(uninterrupted.get_state()))  # survives a text round trip
  expected = _take(uninterrupted, 6)
  resumed = make()
  _take(resumed, 1)  # a different position, overwritten by set_state
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 6), expected)


def test_iterator_state_round_trips_through_orbax(tmp_path):
  src = _stream_file(tmp_path, 5000)
  make = lambda: iter(data_pipeline.make_dataset(src, 16, 4, seed=2))
  it = make()
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(make())))["data"]
  _assert_batches_equal(_take(restored, 3), expected)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("shard_count", [2, 4])
def test_host_shards_are_disjoint_and_tile_the_global_batch(tmp_path, split, shard_count):
  tokens = np.arange(4000, dtype=np.int32)
  kwargs = dict(ctx_len=8, batch_size=8, seed=4, split=split, val_fraction=0.2)
  single = _take(iter(data_pipeline.make_dataset(tokens, **kwargs)), 5)
  hosts = [_take(iter(data_pipeline.make_dataset(tokens, shard_index=i, shard_count=shard_count,
                                        **kwargs)), 5) for i in range(shard_count)]
  for k, global_batch in enumerate(single):
    parts = [h[k]["inputs"] for h in hosts]
    assert all(p.shape == (8 // shard_count, 8) for p in parts)
    starts = np.concatenate([p[:, 0] for p in parts])
    assert len(set(starts)) == len(starts)  # disjoint
    np.testing.assert_array_equal(np.concatenate(parts), global_batch["inputs"])
    np.testing.assert_array_equal(np.concatenate([h[k]["targets"] for h in hosts]),
                                  global_batch["targets"])


@pytest.mark.slow
def test_worker_processes_read_the_same_batches_from_a_memmap(tmp_path):
  # grain's worker processes read absl flags, which absl.app.run parses in real entry points.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  src = _stream_file(tmp_path, 3000)
  in_process = _take(iter(data_pipeline.make_dataset(src, 16, 4, seed=9)), 3)
  with_workers = _take(iter(data_pipeline.make_dataset(src, 16, 4, seed=9, worker_count=1)), 3)
  _assert_batches_equal(with_workers, in_process)


def test_pipeline_errors_say_what_to_change(tmp_path):
  short = tmp_path / "short.txt"
  short.write_bytes(b"x" * 9)
  with pytest.raises(ValueError, match=(
      r"short\.txt.* has 9 tokens; need at least ctx_len \+ 2 = 10; use a longer file or a "
      r"smaller --config\.model\.ctx_len")):
    data_pipeline.make_dataset(data_sources.ByteSource(short), ctx_len=8, batch_size=1, seed=0)
  tokens = np.arange(100)
  with pytest.raises(ValueError, match="fewer than one batch of 8.*larger val_fraction"):
    data_pipeline.make_dataset(tokens, 8, 8, seed=0, split="val", val_fraction=0.2)
  with pytest.raises(ValueError, match="smaller val_fraction"):
    data_pipeline.make_dataset(tokens, 60, 1, seed=0, val_fraction=0.5)
  with pytest.raises(ValueError, match="not divisible by shard_count=3"):
    data_pipeline.make_dataset(tokens, 8, 8, seed=0, shard_count=3)
  with pytest.raises(ValueError, match="use 'train' or 'val'"):
    data_pipeline.make_dataset(tokens, 8, 8, seed=0, split="test")


# ---------------------------------------------------------------------------------------------
# Corpora


@pytest.mark.slow
def test_wiki_sample_from_the_shared_cache_is_wikipedia_xml():
  # Uses the default cache ($RWKV_JAX_CACHE or ~/.cache/rwkv_jax), so it downloads once ever.
  path = corpus.wiki_sample()
  assert abs(path.stat().st_size - 6.09e6) < 0.01e6
  assert path.read_bytes()[:10] == b"<mediawiki"
  batch = next(iter(data_pipeline.make_dataset(data_sources.ByteSource(path), 128, 2, seed=0)))
  assert batch["inputs"].shape == (2, 128)


def test_wiki_sample_uses_a_wheel_placed_in_the_cache_without_network(tmp_path, monkeypatch):
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # any download would fail
  xml = b"<mediawiki>tiny</mediawiki>\n"
  with zipfile.ZipFile(tmp_path / "gensim-4.4.0-py3-none-any.whl", "w") as zf:
    zf.writestr(corpus.GENSIM_MEMBER, bz2.compress(xml))
  path = corpus.wiki_sample(cache_dir=tmp_path)
  assert path == tmp_path / "enwiki_sample.xml" and path.read_bytes() == xml
  assert corpus.wiki_sample(cache_dir=tmp_path) == path  # cached


def test_wiki_sample_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
  for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
  monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
  monkeypatch.setenv("PIP_RETRIES", "0")
  monkeypatch.setenv("PIP_TIMEOUT", "2")
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  with pytest.raises(corpus.DownloadError, match="provide it by hand") as e:
    corpus.wiki_sample(cache_dir=tmp_path)
  assert str(tmp_path / "enwiki_sample.xml") in str(e.value)
  assert not (tmp_path / "enwiki_sample.xml").exists()


def test_enwik8_offline_error_points_to_data_path(tmp_path, monkeypatch):
  monkeypatch.setenv("RWKV_JAX_CACHE", str(tmp_path))  # the env var picks the cache dir
  with pytest.raises(corpus.DownloadError, match=(
      r"enwik8 needs internet access.*--config\.data\.path=FILE")) as e:
    corpus.enwik8(url="http://127.0.0.1:9/enwik8.zip", timeout=2)
  assert str(tmp_path / "enwik8") in str(e.value)
  assert not (tmp_path / "enwik8").exists()


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_binidx_negative_token_ids_are_refused_naming_file_and_position(tmp_path, dtype):
  binidx.write_binidx(tmp_path / "ds", [np.array([1, 2, 3]), np.array([4, -7, 5])], dtype=dtype)
  with pytest.raises(ValueError, match=r"ds\.bin holds the negative token id -7 at position 4 "
                                       r"of the stream \(sequence 1\)"):
    binidx.BinidxSource(tmp_path / "ds")


def _world_vocab(path, extra_lines=()):
  """A World-format vocabulary: every byte b as id b + 1, then `extra_lines`."""
  lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + list(extra_lines)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_encoded_data_is_reused_only_for_the_same_text_and_tokenizer(tmp_path):
  from rwkv_jax.train import config as train_config  # pylint: disable=g-import-not-at-top

  def tokens(text_path, tokenizer_path):
    d = train_config.default_config().data
    d.update(source="file", path=str(text_path), tokenizer=str(tokenizer_path))
    return np.asarray(data_sources.open_training_source(d, tmp_path / "run", 512).tokens).tolist()

  bytes_only = _world_vocab(tmp_path / "bytes.txt")
  with_ab = _world_vocab(tmp_path / "ab.txt", ["300 'ab' 2"])
  first, second = tmp_path / "a" / "text.txt", tmp_path / "b" / "text.txt"  # one name
  first.parent.mkdir()
  second.parent.mkdir()
  first.write_text("ab")
  second.write_text("xyz")
  encoded = tmp_path / "run" / "data" / "text.txt.bin"

  assert tokens(first, bytes_only) == [ord("a") + 1, ord("b") + 1, 0]
  written = encoded.stat().st_mtime_ns
  assert tokens(first, bytes_only) == [ord("a") + 1, ord("b") + 1, 0]
  assert encoded.stat().st_mtime_ns == written  # the same text and tokenizer: not encoded again
  assert tokens(second, bytes_only) == [ord("x") + 1, ord("y") + 1, ord("z") + 1, 0]
  assert tokens(second, with_ab) == [ord("x") + 1, ord("y") + 1, ord("z") + 1, 0]
  assert tokens(first, with_ab) == [300, 0]
  first.write_text("ba")  # the same file, rewritten
  assert tokens(first, with_ab) == [ord("b") + 1, ord("a") + 1, 0]
