"""Documents from JSONL files: one training example per document, with a loss mask.

Two formats, told apart by the first record's fields:

    {"text": "..."}                           one document per line; every token is a target
    {"prompt": "...", "response": "..."}      the loss counts only the response's tokens

Each document is tokenized on its own (prompt and response separately, then joined, so the
boundary is exact) and ended by `encode.END_OF_DOCUMENT`, which counts as a response token: the
model learns where a response stops. Nothing is put between prompt and response; a template
("### Answer:\\n", a newline) belongs in the prompt. Blank lines are skipped.

Documents are never concatenated: the pipeline (rwkv_jax/data/pipeline.py) makes every example
from one document alone, starting from the empty state, padded to ctx_len with the loss mask 0
on the padding. A document longer than ctx_len + 1 tokens is split into consecutive windows
whose targets tile it (each window starts from the empty state: what came before in the
document is not seen); a window with no counted target (e.g. all prompt) is dropped.

A line that is not a JSON object, or lacks a field of its file's format, is a `JsonlError`
naming the file and the line.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Literal

import numpy as np

from rwkv_jax.data import encode
from rwkv_jax.data.tokenizer import Tokenizer

Format = Literal["text", "prompt_response"]
FIELDS: dict[str, tuple[str, ...]] = {"text": ("text",), "prompt_response": ("prompt", "response")}


class JsonlError(ValueError):
  """A JSONL line that cannot be read; the message starts with FILE:LINE."""


def is_jsonl(path: str | os.PathLike) -> bool:
  """Whether `path` names a JSONL file (by its .jsonl suffix)."""
  return pathlib.Path(path).suffix.lower() == ".jsonl"


class DocumentSource:
  """The tokenized documents of a JSONL file, kept in memory.

  Attributes:
    path: the file.
    format: "text" or "prompt_response".
    tokens: int32 [n], every document's tokens one after another.
    loss_mask: uint8 [n], 1 where the token counts as a target (0 on prompt tokens).
    offsets: int64 [d + 1], document i is tokens[offsets[i]:offsets[i + 1]].
    lines: int64 [d], the line of the file each document came from (1-based).
  """

  def __init__(self, path: pathlib.Path, fmt: Format, docs: list[np.ndarray],
               masks: list[np.ndarray], lines: list[int]):
    self.path, self.format = path, fmt
    self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    self.tokens = np.concatenate(docs).astype(np.int32) if docs else np.zeros((0,), np.int32)
    self.loss_mask = np.concatenate(masks).astype(np.uint8) if masks else np.zeros((0,), np.uint8)
    self.lines = np.asarray(lines, np.int64)

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Document i's (tokens, loss_mask)."""
    s, e = self.offsets[i], self.offsets[i + 1]
    return self.tokens[s:e], self.loss_mask[s:e]

  def __len__(self) -> int:
    return len(self.tokens)

  def __repr__(self) -> str:
    return (f"DocumentSource({str(self.path)!r}, {self.format}, {self.num_documents} documents, "
            f"{len(self)} tokens)")


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
  ids = tokenizer.encode(text)
  return list(getattr(ids, "ids", ids))  # accept tokenizers.Encoding too


def read_jsonl(path: str | os.PathLike, tokenizer: Tokenizer, *,
               end_of_document: int | None = encode.END_OF_DOCUMENT) -> DocumentSource:
  """Reads and tokenizes a JSONL file of documents (see the module docstring for the formats).

  Args:
    path: the .jsonl file, UTF-8.
    tokenizer: any object with `.encode(str) -> list[int]`.
    end_of_document: token appended to every document (a target, also in prompt/response
      files), or None for none.

  Returns:
    The documents, in file order.

  Raises:
    FileNotFoundError: no such file.
    JsonlError: a line is not a JSON object, or lacks a string field its format needs; or the
      file holds no document.
  """
  path = pathlib.Path(path).expanduser()
  encode.check_exists(path, "JSONL file")
  fmt: Format | None = None
  docs, masks, lines = [], [], []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise JsonlError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise JsonlError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must "
                         f"be one JSON object.") from None
      if not isinstance(record, dict):
        raise JsonlError(f"{where}: a JSON {type(record).__name__}, not an object; each line "
                         f"must be an object with a \"text\" field, or \"prompt\" and "
                         f"\"response\" fields.")
      if fmt is None:
        if "prompt" in record or "response" in record:
          fmt = "prompt_response"
        elif "text" in record:
          fmt = "text"
        else:
          raise JsonlError(f"{where}: no \"text\" field, nor \"prompt\" and \"response\" fields "
                           f"(found {sorted(record)[:8]}); use one of the two formats.")
      for field in FIELDS[fmt]:
        if field not in record:
          raise JsonlError(f"{where}: missing field {field!r}; every line of a {fmt} file needs "
                           f"{' and '.join(repr(f) for f in FIELDS[fmt])} (the first record "
                           f"set the format).")
        if not isinstance(record[field], str):
          raise JsonlError(f"{where}: field {field!r} is a {type(record[field]).__name__}, not "
                           f"a string.")
      if fmt == "text":
        prompt, response = [], _ids(tokenizer, record["text"])
      else:
        prompt, response = _ids(tokenizer, record["prompt"]), _ids(tokenizer, record["response"])
      if end_of_document is not None:
        response.append(end_of_document)
      docs.append(np.asarray(prompt + response, np.int64))
      masks.append(np.concatenate([np.zeros(len(prompt), np.uint8),
                                   np.ones(len(response), np.uint8)]))
      lines.append(lineno)
  if not docs:
    raise JsonlError(f"{path}:1: the file holds no JSON lines; put one document per line.")
  return DocumentSource(path, fmt, docs, masks, lines)
