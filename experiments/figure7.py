r"""The paper's Figure 7: cumulative generation time against generated tokens, RWKV vs Transformer.

RWKV generates with a constant-size state, so each token costs the same and the cumulative time
grows linearly; a Transformer with a KV cache attends over every past token, so each token costs
more than the last and the cumulative time grows quadratically. Both models here have the same
width, depth and (within 1%) parameter count, random weights (speed does not depend on them), and
generate greedily in one batch, in chunks of `--chunk` tokens run as one compiled `lax.scan`. The
Transformer's cache grows by `--chunk` positions before each chunk (a copy, as a growing cache
costs); every chunk program is compiled before the clock starts.

  python -m experiments.figure7                      # L6 D512, 8,192 tokens: CPU, ~2 minutes
  python -m experiments.figure7 --n_layer=24 --n_embd=2048 --tokens=16384   # an accelerator

Writes experiments/results/figure7_<tag>.json and .png.
"""

from __future__ import annotations

import logging
import pathlib
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from experiments import _cli, benchlib, plots
from experiments.baselines import transformer as tf_lib
from rwkv_jax import model as model_lib
from rwkv_jax.config import RWKVConfig


def _define_flags() -> None:
  """Flags exist only when this file runs as a program (no clash with other runners in a test)."""
  flags.DEFINE_integer("n_layer", 6, "Layers of both models.")
  flags.DEFINE_integer("n_embd", 512, "Width of both models.")
  flags.DEFINE_integer("n_head", 8, "Attention heads of the Transformer.")
  flags.DEFINE_integer("vocab_size", 256, "Vocabulary of both models.")
  flags.DEFINE_integer("tokens", 8192, "Tokens to generate.", lower_bound=1)
  flags.DEFINE_integer("chunk", 512, "Tokens per compiled decode program.", lower_bound=1)
  flags.DEFINE_integer("batch", 1, "Sequences generated together.", lower_bound=1)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                      "Directory for the JSON and PNG.")
  flags.DEFINE_string("tag", None, "File name suffix; default: the device, e.g. cpu.")


def _greedy_chunk(graphdef, params, token_b, carry, n: int):
  """n greedy steps of model.step from (token_b, carry); returns the last token and the carry."""
  model = nnx.merge(graphdef, params)

  def body(c, _):
    tok, state = c
    logits, state = model.step(tok, state)
    return (jnp.argmax(logits, -1).astype(jnp.int32), state), None

  (token_b, carry), _ = jax.lax.scan(body, (token_b, carry), None, length=n)
  return token_b, carry


_greedy_chunk_jit = jax.jit(_greedy_chunk, static_argnums=(0, 4))
_grow_jit = jax.jit(tf_lib.grow, static_argnums=1)


class _Decoder:
  """One model's chunk programs, compiled before timing, and its running clock."""

  def __init__(self, name, model, first_carry, next_carry, num_chunks, chunk, batch):
    self.name, self.next_carry = name, next_carry
    graphdef, self.params = nnx.split(model)
    self.token = jnp.zeros((batch,), jnp.int32)
    # Compile every chunk program first (the Transformer's differ in cache size).
    shapes = jax.eval_shape(lambda: first_carry)  # shapes only: nothing runs while compiling
    self.programs, start = [], time.perf_counter()
    for i in range(num_chunks):
      shapes = jax.eval_shape(lambda c, i=i: next_carry(c, i), shapes)
      self.programs.append(
          _greedy_chunk_jit.lower(graphdef, self.params, self.token, shapes, chunk).compile())
    self.compile_s = time.perf_counter() - start
    logging.info("%s: %d chunk programs compiled in %.1f s", name, num_chunks, self.compile_s)
    self.carry, self.elapsed, self.cumulative_s = first_carry, 0.0, []

  def run_chunk(self, i: int) -> None:
    start = time.perf_counter()
    self.carry = self.next_carry(self.carry, i)
    self.token, self.carry = self.programs[i](self.params, self.token, self.carry)
    jax.block_until_ready((self.token, self.carry))
    self.elapsed += time.perf_counter() - start
    self.cumulative_s.append(self.elapsed)


def configs(n_layer, n_embd, n_head, vocab_size, tokens, dtype
            ) -> tuple[RWKVConfig, tf_lib.TransformerConfig]:
  """The two models' configs; ValueError for shapes they cannot take (heads that do not split)."""
  rwkv_cfg = RWKVConfig(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, ctx_len=tokens,
                        dtype=dtype)
  tf_cfg = tf_lib.TransformerConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                    vocab_size=vocab_size, ctx_len=tokens, dtype=dtype)
  return rwkv_cfg, tf_cfg


def run(n_layer, n_embd, n_head, vocab_size, tokens, chunk, batch, dtype) -> dict:
  num_chunks = -(-tokens // chunk)
  tokens = num_chunks * chunk
  rwkv_cfg, tf_cfg = configs(n_layer, n_embd, n_head, vocab_size, tokens, dtype)
  rwkv = model_lib.RWKV(rwkv_cfg, rngs=nnx.Rngs(0))
  tf = tf_lib.Transformer(tf_cfg, rngs=nnx.Rngs(0))

  state0 = model_lib.empty_state(rwkv_cfg, batch)
  cache0 = tf_lib.empty_cache(tf_cfg, batch, 0)
  decoders = [
      _Decoder("rwkv", rwkv, state0, lambda c, i: c, num_chunks, chunk, batch),
      _Decoder("transformer", tf, cache0, lambda c, i: _grow_jit(c, (i + 1) * chunk),
               num_chunks, chunk, batch),
  ]
  # Chunks alternate between the models, so that other load on the host slows both alike.
  for i in range(num_chunks):
    for d in decoders:
      d.run_chunk(i)
    logging.info("%d tokens: rwkv %.2f s, transformer %.2f s", (i + 1) * chunk,
                 decoders[0].elapsed, decoders[1].elapsed)
  (rwkv_s, rwkv_compile), (tf_s, tf_compile) = ((d.cumulative_s, d.compile_s) for d in decoders)

  positions = [(i + 1) * chunk for i in range(num_chunks)]
  state_bytes = sum(x.nbytes for x in state0) // batch
  cache_bytes = [2 * n_layer * p * n_embd * jnp.dtype(dtype).itemsize for p in positions]

  def per_token_ms(cum):
    return [1e3 * (b - a) / chunk for a, b in zip([0.0] + cum[:-1], cum)]

  return {
      "benchmark": "figure7_generation_time",
      "environment": benchlib.environment(),
      "models": {
          "rwkv": {**rwkv_cfg.to_dict(), "num_params": rwkv_cfg.num_params()},
          "transformer": {**tf_cfg.__dict__, "num_params": tf_cfg.num_params()},
      },
      "batch": batch, "chunk": chunk, "tokens": tokens, "decoding": "greedy, random weights",
      "generated_tokens": positions,
      "rwkv_cumulative_s": rwkv_s,
      "transformer_cumulative_s": tf_s,
      "rwkv_ms_per_token": per_token_ms(rwkv_s),
      "transformer_ms_per_token": per_token_ms(tf_s),
      "compile_s": {"rwkv": rwkv_compile, "transformer": tf_compile},
      "memory_per_sequence_bytes": {"rwkv_state": state_bytes, "transformer_kv_cache": cache_bytes},
  }


def plot(record: dict, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  x = record["generated_tokens"]
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  a.plot(x, record["rwkv_cumulative_s"], "o-", label="RWKV (constant-size state)")
  a.plot(x, record["transformer_cumulative_s"], "s-", label="Transformer (KV cache)")
  a.set(xlabel="generated tokens", ylabel="cumulative time (s)", title="Generation time")
  a.legend()
  mem = record["memory_per_sequence_bytes"]
  b.plot(x, [mem["rwkv_state"] / 2**20] * len(x), "o-", label="RWKV state")
  b.plot(x, [m / 2**20 for m in mem["transformer_kv_cache"]], "s-", label="Transformer KV cache")
  b.set(xlabel="generated tokens", ylabel="MiB per sequence", title="Memory per sequence")
  b.legend()
  env = record["environment"]
  fig.suptitle(f"L{record['models']['rwkv']['n_layer']} D{record['models']['rwkv']['n_embd']}, "
               f"batch {record['batch']}, {env.get('device_kind', '')}", fontsize=9)
  plots.save_figure(fig, path)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  f = flags.FLAGS
  with _cli.user_input(ValueError):  # e.g. --n_embd that --n_head does not divide
    configs(f.n_layer, f.n_embd, f.n_head, f.vocab_size, f.tokens, f.dtype)
  out = _cli.output_path("out", f.out, directory=True)
  record = run(f.n_layer, f.n_embd, f.n_head, f.vocab_size, f.tokens, f.chunk, f.batch, f.dtype)
  tag = f.tag or benchlib.default_tag()
  path = benchlib.write_json(out / f"figure7_{tag}.json", record)
  plot(record, out / f"figure7_{tag}.png")
  r, t = record["rwkv_ms_per_token"], record["transformer_ms_per_token"]
  print(f"ms per token, first and last chunk: RWKV {r[0]:.3f} -> {r[-1]:.3f}, "
        f"Transformer {t[0]:.3f} -> {t[-1]:.3f}; total {record['rwkv_cumulative_s'][-1]:.1f} s "
        f"vs {record['transformer_cumulative_s'][-1]:.1f} s. Wrote {path}")


if __name__ == "__main__":
  _define_flags()
  _cli.run(main)
