"""Tokenizers behind one interface: `encode(text) -> ids`, `decode(ids) -> text`, `vocab_size`.

  * `ByteTokenizer`: UTF-8 bytes, vocab 256 (character-level work such as enwik8).
  * `NeoXTokenizer`: the GPT-NeoX 20B BPE of the RWKV-4 Pile models (vocab 50277), through the
    `tokenizers` library.
  * `WorldTokenizer`: the RWKV World vocabulary (vocab 65536), greedy longest match over bytes.

`load_tokenizer("bytes" | "neox" | "world" | path)` picks one; "neox" and "world" fetch the standard
files once (see `rwkv_jax.assets`).
"""

from __future__ import annotations

import abc
import ast
import os
import pathlib
from collections.abc import Iterable

from rwkv_jax import assets

TOKENIZER_NAMES = ("bytes", "neox", "world")


def _as_ids(ids: Iterable[int]) -> list[int]:
  """Accepts lists, numpy and jax arrays; returns plain Python ints."""
  if hasattr(ids, "tolist"):
    ids = ids.tolist()
  return [int(i) for i in ids]


class Tokenizer(abc.ABC):
  """Text <-> token ids.

  Attributes:
    vocab_size: number of rows the model's embedding needs; every id is in [0, vocab_size).
    end_of_text_id: id that separates documents, or None if the vocabulary has none.
  """

  vocab_size: int
  end_of_text_id: int | None

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text`."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids`; invalid UTF-8 becomes U+FFFD."""

  def _check_ids(self, ids: list[int]) -> None:
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(
          f"token ids {bad[:5]} are outside [0, {self.vocab_size}) of {type(self).__name__}; "
          "decode ids produced by the same tokenizer")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens: ids 0..255, no end-of-text token."""

  vocab_size = 256
  end_of_text_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    ids = _as_ids(ids)
    self._check_ids(ids)
    # A sampled sequence may cut a multi-byte character; keep going rather than fail.
    return bytes(ids).decode("utf-8", errors="replace")


class NeoXTokenizer(Tokenizer):
  """The GPT-NeoX 20B tokenizer (`20B_tokenizer.json`) used by the RWKV-4 Pile models.

  The file's normalizer is NFC, so `decode(encode(text)) == text` holds for NFC text.
  """

  def __init__(self, path: str | os.PathLike[str]):
    """Loads a `tokenizers` JSON file.

    Args:
      path: the tokenizer JSON, e.g. from `rwkv_jax.assets.neox_tokenizer_json()`.
    """
    # Imported here so that byte- and World-level work does not need the library.
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    self.path = path
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.end_of_text_id = self._tok.token_to_id("<|endoftext|>")

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = _as_ids(ids)
    # The library silently drops unknown ids; a wrong-vocabulary mistake should be loud.
    self._check_ids(ids)
    # Keep <|endoftext|> visible so that decode(encode(text)) gives the text back.
    return self._tok.decode(ids, skip_special_tokens=False)


class WorldTokenizer(Tokenizer):
  """The RWKV World tokenizer: greedy longest match over UTF-8 bytes.

  At each position the longest vocabulary entry that is a prefix of the remaining bytes is taken.
  Every single byte is in the vocabulary, so any input encodes. Id 0 is end-of-text and decodes to
  nothing.
  """

  # The byte trie is nested dicts {byte: child}; a node that ends a token holds its id under this
  # key (not a byte value, so it cannot clash with a child).
  _ID = -1

  def __init__(self, path: str | os.PathLike[str], vocab_size: int | None = None):
    """Reads a vocabulary file with lines `id repr(token) byte_length` (CRLF or LF endings).

    Args:
      path: the vocabulary, e.g. from `rwkv_jax.assets.world_vocab()`.
      vocab_size: embedding rows; defaults to the largest id + 1 rounded up to a multiple of 64
        (65536 for `rwkv_vocab_v20230424.txt`, the size of the RWKV World models).
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"vocabulary file {path} does not exist")
    self.path = path
    id_to_bytes: dict[int, bytes] = {}
    # Split on b"\n" only: token literals are escaped, and str.splitlines would also break on
    # characters such as U+2028 or U+0085.
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
      line = raw.rstrip(b"\r").decode("utf-8")
      if not line:
        continue
      try:
        first, last = line.index(" "), line.rindex(" ")
        idx = int(line[:first])
        token = ast.literal_eval(line[first + 1:last])
        length = int(line[last + 1:])
      except (ValueError, SyntaxError) as e:
        raise ValueError(
            f"{path}:{lineno}: expected `id repr(token) byte_length`, got {line[:80]!r}") from e
      if isinstance(token, str):
        token = token.encode("utf-8")
      if not isinstance(token, bytes) or len(token) != length or not token:
        raise ValueError(f"{path}:{lineno}: token {token!r} does not have {length} bytes")
      if idx in id_to_bytes or idx <= 0:
        raise ValueError(f"{path}:{lineno}: id {idx} is repeated or not positive (0 is "
                         "reserved for end-of-text)")
      id_to_bytes[idx] = token

    max_id = max(id_to_bytes, default=0)
    if vocab_size is None:
      vocab_size = -(-(max_id + 1) // 64) * 64
    if vocab_size <= max_id:
      raise ValueError(f"vocab_size={vocab_size} must exceed the largest id {max_id} in {path}")
    self.vocab_size = vocab_size
    self.end_of_text_id = 0

    self._id_to_bytes: list[bytes | None] = [None] * vocab_size
    self._id_to_bytes[0] = b""
    root: dict[int, dict] = {}
    for idx, token in id_to_bytes.items():
      self._id_to_bytes[idx] = token
      node = root
      for byte in token:
        node = node.setdefault(byte, {})
      if self._ID in node:
        raise ValueError(
            f"{path}: token {token!r} appears twice (ids {node[self._ID]} and {idx})")
      node[self._ID] = idx
    missing = [b for b in range(256) if self._ID not in root.get(b, {})]
    if missing:
      raise ValueError(f"{path}: single bytes {missing[:5]} are missing, so some text cannot "
                       "be encoded; use a vocabulary that covers all 256 bytes")
    self._root = root

  def encode(self, text: str) -> list[int]:
    return self.encode_bytes(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> list[int]:
    """Returns the token ids of raw bytes (any bytes, not only valid UTF-8)."""
    root, id_key = self._root, self._ID
    ids: list[int] = []
    n, i = len(data), 0
    while i < n:
      # Walk the trie as far as the bytes allow, remembering the last node that ends a token.
      # The first byte always matches a token, so `best` is always set.
      node, j, best, end = root, i, 0, i
      while j < n:
        node = node.get(data[j])
        if node is None:
          break
        j += 1
        idx = node.get(id_key)
        if idx is not None:
          best, end = idx, j
      ids.append(best)
      i = end
    return ids

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    """Returns the bytes of `ids` (end-of-text contributes nothing)."""
    ids = _as_ids(ids)
    self._check_ids(ids)
    parts = [self._id_to_bytes[i] for i in ids]
    if None in parts:
      unused = [i for i, p in zip(ids, parts) if p is None]
      raise ValueError(f"token ids {unused[:5]} are not in the vocabulary {self.path}")
    return b"".join(parts)

  def decode(self, ids: Iterable[int]) -> str:
    # Decoding the whole byte string at once keeps characters split across tokens intact.
    return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(spec: str | os.PathLike[str],
                   cache_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
  """Builds a tokenizer from a name or a file.

  Args:
    spec: "bytes", "neox" (GPT-NeoX 20B, fetched once), "world" (RWKV World, fetched once), a
      path to a `tokenizers` .json file, or a path to a World-format .txt vocabulary.
    cache_dir: where "neox" and "world" files are cached (see `rwkv_jax.assets`).

  Returns:
    The tokenizer.

  Raises:
    FileNotFoundError: `spec` is a .json/.txt path that does not exist.
    ValueError: `spec` is neither a known name nor a .json/.txt path.
  """
  name = os.fspath(spec)
  if name == "bytes":
    return ByteTokenizer()
  if name == "neox":
    return NeoXTokenizer(assets.neox_tokenizer_json(cache_dir))
  if name == "world":
    return WorldTokenizer(assets.world_vocab(cache_dir))
  path = pathlib.Path(name).expanduser()
  suffix = path.suffix.lower()
  if suffix in (".json", ".txt"):
    if not path.is_file():
      raise FileNotFoundError(
          f"tokenizer file {path} does not exist; pass an existing .json (tokenizers file) or "
          f".txt (RWKV World vocabulary) path, or one of {TOKENIZER_NAMES} to use the standard "
          "files")
    return NeoXTokenizer(path) if suffix == ".json" else WorldTokenizer(path)
  raise ValueError(
      f"unknown tokenizer {name!r}; choose one of {TOKENIZER_NAMES}, a .json tokenizers file or a "
      ".txt RWKV World vocabulary")
