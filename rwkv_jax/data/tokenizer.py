"""Tokenizers behind one interface: `encode(text) -> ids`, `decode(ids) -> text`, `vocab_size`.

  * `ByteTokenizer`: UTF-8 bytes, vocab 256 (character-level work such as enwik8).
  * `NeoXTokenizer`: the GPT-NeoX 20B BPE of the RWKV-4 Pile models (vocab 50277), through the
    `tokenizers` library.
  * `WorldTokenizer`: the RWKV World vocabulary (vocab 65536), greedy longest match over bytes.

`load_tokenizer("bytes" | "neox" | "world" | path)` picks one; "neox" and "world" fetch the
standard files once (see `rwkv_jax.data.assets`). `StreamDecoder` turns ids into text one token at
a time (for printing generation as it comes) with work per token that does not grow with the text.
"""

from __future__ import annotations

import abc
import ast
import codecs
import os
import pathlib
from collections.abc import Iterable

from rwkv_jax.data import assets

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

  def token_bytes(self, token_id: int) -> bytes | None:
    """The bytes token `token_id` contributes to the UTF-8 text of any sequence holding it.

    `decode(ids)` is then the UTF-8 decoding (errors replaced) of the tokens' joined bytes, which
    is what lets `StreamDecoder` decode one token at a time. None where a tokenizer's text is not
    built that way.
    """
    del token_id
    return None

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

  def token_bytes(self, token_id: int) -> bytes:
    self._check_ids([int(token_id)])
    return bytes([int(token_id)])


class NeoXTokenizer(Tokenizer):
  """The GPT-NeoX 20B tokenizer (`20B_tokenizer.json`) used by the RWKV-4 Pile models.

  The file's normalizer is NFC, so `decode(encode(text)) == text` holds for NFC text.
  """

  def __init__(self, path: str | os.PathLike[str]):
    """Loads a `tokenizers` JSON file.

    Args:
      path: the tokenizer JSON, e.g. from `rwkv_jax.data.assets.neox_tokenizer_json()`.
    """
    # Imported here so that byte- and World-level work does not need the library.
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {path} does not exist")
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for a file it cannot parse
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"{path} is not a `tokenizers` JSON file ({reason[:200]}); pass a "
                       f"tokenizer.json such as 20B_tokenizer.json, or 'neox'") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.end_of_text_id = self._tok.token_to_id("<|endoftext|>")
    # Per-token bytes exist for the byte-level decoder of GPT-2 style BPEs (NeoX's among them).
    self._byte_level = isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel)
    self._token_bytes: dict[int, bytes] = {}

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = _as_ids(ids)
    # The library silently drops unknown ids; a wrong-vocabulary mistake should be loud.
    self._check_ids(ids)
    # Keep <|endoftext|> visible so that decode(encode(text)) gives the text back.
    return self._tok.decode(ids, skip_special_tokens=False)

  def token_bytes(self, token_id: int) -> bytes | None:
    if not self._byte_level:
      return None
    token_id = int(token_id)
    found = self._token_bytes.get(token_id)
    if found is None:
      self._check_ids([token_id])
      # As the library's ByteLevel decoder: every character of the token's string maps back to
      # one byte, or, if any does not (added tokens such as <|endoftext|> or runs of spaces),
      # the string's own UTF-8 bytes are used.
      token = self._tok.id_to_token(token_id)
      table = _unicode_to_byte()
      if all(ch in table for ch in token):
        found = bytes(table[ch] for ch in token)
      else:
        found = token.encode("utf-8")
      self._token_bytes[token_id] = found
    return found


# Ids of a World vocabulary lie below this (65536 in the real one); a larger id is damage, and
# would size the id table from the file's say-so.
_MAX_WORLD_ID = 1 << 24


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
      path: the vocabulary, e.g. from `rwkv_jax.data.assets.world_vocab()`.
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
      try:
        line = raw.rstrip(b"\r").decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: byte {e.start} of the line is not UTF-8; a World "
                         f"vocabulary is UTF-8 text (e.g. rwkv_vocab_v20230424.txt)") from None
      if not line:
        continue
      try:
        first, last = line.index(" "), line.rindex(" ")
        idx = int(line[:first])
        literal = line[first + 1:last]
        # Only a quoted str or bytes literal: literal_eval runs no code, but deeply nested
        # expressions exhaust its parser.
        if not literal.startswith(("'", '"', "b'", 'b"')):
          raise ValueError(literal)
        token = ast.literal_eval(literal)
        length = int(line[last + 1:])
      except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{path}:{lineno}: expected `id repr(token) byte_length`, got "
                         f"{line[:80]!r}") from None
      if isinstance(token, str):
        token = token.encode("utf-8")
      if not isinstance(token, bytes) or len(token) != length or not token:
        raise ValueError(f"{path}:{lineno}: token {str(token)[:80]} does not have {length} "
                         "bytes")
      if idx in id_to_bytes or not 0 < idx < _MAX_WORLD_ID:
        raise ValueError(f"{path}:{lineno}: id {idx} is repeated or not in [1, {_MAX_WORLD_ID}) "
                         "(0 is reserved for end-of-text)")
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

  def token_bytes(self, token_id: int) -> bytes:
    return self.decode_bytes([token_id])


_BYTE_TABLE: dict[str, int] = {}


def _unicode_to_byte() -> dict[str, int]:
  """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the other 68
  bytes for the characters U+0100 onwards, in byte order."""
  if not _BYTE_TABLE:
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in kept]
    _BYTE_TABLE.update({chr(b): b for b in kept})
    _BYTE_TABLE.update({chr(256 + i): b for i, b in enumerate(shifted)})
  return _BYTE_TABLE


class StreamDecoder:
  """Decodes token ids one at a time; the pieces joined equal `tokenizer.decode(all ids)`.

    stream = StreamDecoder(tokenizer)
    for token in tokens:
      print(stream.add(token), end="")
    print(stream.flush())

  A character whose UTF-8 bytes are split across tokens comes out whole, with the token that
  completes it. Where the tokenizer gives per-token bytes (`Tokenizer.token_bytes`: the byte,
  World and NeoX tokenizers) each token is decoded alone through an incremental UTF-8 decoder, so
  the work per token is constant. Otherwise the tokens since the last complete character are
  decoded together, at most `max_pending` of them, after which they are let out as they are.

  Attributes:
    bytes_decoded: bytes (or, without per-token bytes, tokens) passed to a decoder so far.
  """

  def __init__(self, tokenizer: Tokenizer, max_pending: int = 16):
    self._tok = tokenizer
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    self._pending: list[int] = []
    self._max_pending = max_pending
    self.bytes_decoded = 0

  def add(self, token_id: int) -> str:
    """Takes one token; returns the text it completes (possibly empty)."""
    data = self._tok.token_bytes(token_id)
    if data is not None:
      self.bytes_decoded += len(data)
      return self._utf8.decode(data)
    self._pending.append(int(token_id))
    self.bytes_decoded += len(self._pending)
    text = self._tok.decode(self._pending)
    if text.endswith("\ufffd") and len(self._pending) < self._max_pending:
      return ""
    self._pending = []
    return text

  def flush(self) -> str:
    """The text still held back (an incomplete character, decoded with replacement)."""
    text = self._utf8.decode(b"", final=True)
    if self._pending:
      text += self._tok.decode(self._pending)
      self._pending = []
    return text


def load_tokenizer(spec: str | os.PathLike[str],
                   cache_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
  """Builds a tokenizer from a name or a file.

  Args:
    spec: "bytes", "neox" (GPT-NeoX 20B, fetched once), "world" (RWKV World, fetched once), a
      path to a `tokenizers` .json file, or a path to a World-format .txt vocabulary.
    cache_dir: where "neox" and "world" files are cached (see `rwkv_jax.data.assets`).

  Returns:
    The tokenizer.

  Raises:
    FileNotFoundError: `spec` is a .json/.txt path that does not exist.
    ValueError: `spec` is neither a known name nor a .json/.txt path, or the file is not a
      tokenizer of its kind (one line naming the file, and for a vocabulary the line).
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
