"""experiments.generate: streamed text, the scripting flags, the prompt cache, one-line errors.

The command-line cases are real subprocesses on a tiny byte-level model.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_sampling import CFG, REPO

from rwkv_jax.data import assets
from rwkv_jax.data import tokenizer as tokenizer_lib
from rwkv_jax.infer import sampling
from rwkv_jax.io import formats, state_file
from training_util import one_line_error, random_model, write_pth

# ----------------------------------------------------------------------------------------------
# Streaming: incremental decoding.

def _tokenizers():
  yield tokenizer_lib.ByteTokenizer()
  yield tokenizer_lib.WorldTokenizer(assets.world_vocab())
  yield tokenizer_lib.NeoXTokenizer(assets.neox_tokenizer_json())


def _multibyte_ids(tok, rng, n):
  """Token ids of text full of characters of 2 to 4 UTF-8 bytes, plus random ids: characters
  split across tokens and bytes that are not UTF-8 at all."""
  text = "".join(rng.choice(list("aé€😀中 ß\n")) for _ in range(n))
  ids = tok.encode(text)
  if isinstance(tok, tokenizer_lib.WorldTokenizer):  # some ids are unused there
    ids += tok.encode_bytes(bytes(rng.integers(0, 256, size=n).tolist()))
  else:
    ids += rng.integers(0, tok.vocab_size, size=n).tolist()
  return ids


@pytest.mark.parametrize("tok", list(_tokenizers()), ids=lambda t: type(t).__name__)
def test_streamed_text_equals_the_text_decoded_at_once(tok):
  rng = np.random.default_rng(0)
  for _ in range(5):
    ids = _multibyte_ids(tok, rng, 60)
    rng.shuffle(ids)  # split multi-byte characters between tokens at random places too
    stream = tokenizer_lib.StreamDecoder(tok)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("tok", list(_tokenizers()), ids=lambda t: type(t).__name__)
def test_streaming_decodes_each_token_once(tok, monkeypatch):
  ids = _multibyte_ids(tok, np.random.default_rng(1), 400)
  want = tok.decode(ids)
  monkeypatch.setattr(tok, "decode", lambda _: pytest.fail("decoded the whole text again"))
  stream = tokenizer_lib.StreamDecoder(tok)
  text = []
  for i in ids:
    before = stream.bytes_decoded
    text.append(stream.add(i))
    assert stream.bytes_decoded - before == len(tok.token_bytes(i))  # this token's bytes only
  assert "".join(text) + stream.flush() == want


def test_streaming_without_per_token_bytes_holds_back_a_bounded_window():
  class Pieces(tokenizer_lib.ByteTokenizer):  # a tokenizer whose text is not per-token bytes
    def token_bytes(self, token_id):
      return None

  tok = Pieces()
  ids = list("héllo €😀 wörld".encode())
  stream = tokenizer_lib.StreamDecoder(tok, max_pending=4)
  text = "".join(stream.add(i) for i in ids) + stream.flush()
  assert text == tok.decode(ids)
  assert stream.bytes_decoded <= 4 * len(ids)  # at most max_pending tokens decoded per token


# ----------------------------------------------------------------------------------------------
# The command line.

@pytest.fixture(scope="module")
def model():
  return random_model(CFG, seed=5)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
  return write_pth(model, tmp_path_factory)


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _greedy(model, prompt, n):
  return sampling.generate(model, [prompt], n, jax.random.key(0),
                           sampling=sampling.SamplingConfig(temperature=0.0))


@pytest.mark.slow
def test_prompt_tokens_output_and_the_prompt_cache_from_the_command_line(model, checkpoint,
                                                                          tmp_path):
  first, second = [72, 101, 108, 108, 111], [32, 119, 111]
  cache, out = tmp_path / "first.state", tmp_path / "out.json"
  # Prefill only: the prompt's state, no output text.
  proc = run_cli(f"--checkpoint={checkpoint}", "--tokenizer=bytes", "--max_tokens=0",
                 f"--prompt_tokens={','.join(map(str, first))}", f"--save_state={cache}")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == "" and state_file.load(cache, CFG).tokens_consumed == (5,)
  # Continue it with more prompt: the tokens of the whole prompt in one go.
  proc = run_cli(f"--checkpoint={checkpoint}", "--tokenizer=bytes", "--max_tokens=9",
                 "--temperature=0", f"--load_state={cache}",
                 f"--prompt_tokens={','.join(map(str, second))}", f"--output={out}",
                 f"--save_state={tmp_path / 'after.state'}")
  assert proc.returncode == 0, proc.stderr
  whole = _greedy(model, first + second, 9)
  assert json.loads(out.read_text()) == whole.sequences()
  assert proc.stdout == tokenizer_lib.ByteTokenizer().decode(whole.sequences()[0]) + "\n"
  assert state_file.load(tmp_path / "after.state", CFG).tokens_consumed == (5 + 3 + 9,)


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("top_p", "--top_p must be in (0, 1]"),
    ("output under a file", "--output=BROKEN/out.json cannot be written: BROKEN is a file, not a "
                            "directory"),
    ("damaged checkpoint", "--checkpoint=BROKEN"),
    ("prompt tokens", "--prompt_tokens='1,x' must be comma-separated integers"),
    ("foreign state", "--load_state: BROKEN holds the state of a model with n_layer=3"),
])
def test_mistakes_are_one_line_naming_the_flag_and_write_nothing(checkpoint, tmp_path, case,
                                                                 expected):
  broken = tmp_path / "broken"
  out, cache = tmp_path / "out.json", tmp_path / "new.state"
  args = [f"--checkpoint={checkpoint}", "--tokenizer=bytes", "--prompt=Hi", "--max_tokens=3",
          f"--output={out}", f"--save_state={cache}"]
  # (Damaged state files, other sampling flags: the same paths, pinned in test_state_file.py and
  # by absl's flag validation.)
  if case == "top_p":
    args.append("--top_p=0")
  elif case == "output under a file":
    broken.write_text("a file")
    args.append(f"--output={broken / 'out.json'}")
  elif case == "damaged checkpoint":
    broken.write_bytes(checkpoint.read_bytes()[:3000])
    args.append(f"--checkpoint={broken}")
  elif case == "prompt tokens":
    args.remove("--prompt=Hi")
    args.append("--prompt_tokens=1,x")
  elif case == "foreign state":
    other = CFG.replace(n_layer=3)
    state_file.save(broken, state_file.SavedState.of(
        other, random_state(other), np.zeros((1, 256), np.float32), 4))
    args.append(f"--load_state={broken}")
  line = one_line_error(run_cli(*args), 2)
  expected = expected.replace("BROKEN", str(broken))
  assert expected in line
  assert not out.exists() and not cache.exists()


def random_state(cfg):
  from rwkv_jax import model as model_lib
  return model_lib.empty_state(cfg, 1)
