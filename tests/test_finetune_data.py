"""Fine-tuning data: JSONL documents (rwkv_jax/data/documents.py), their grain pipeline with a loss
mask (rwkv_jax/data/pipeline.py), and the mask through the loss, the step and the metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rwkv_jax import model as model_lib
from rwkv_jax import sharding
from rwkv_jax.config import RWKVConfig
from rwkv_jax.data import documents
from rwkv_jax.data import pipeline as data_pipeline
from rwkv_jax.data import sources as data_sources
from rwkv_jax.data.tokenizer import load_tokenizer
from rwkv_jax.io import formats
from rwkv_jax.train import bptt, finetune
from rwkv_jax.train import loop as train_loop
from rwkv_jax.train import losses
from rwkv_jax.train import metrics as metrics_lib
from rwkv_jax.train import step as step_lib
from training_util import REPO, one_line_error, random_model, subprocess_env, tiny_config

BYTES = load_tokenizer("bytes")
EOD = 0  # encode.END_OF_DOCUMENT
CFG = RWKVConfig(n_layer=1, n_embd=16, vocab_size=256, ctx_len=64, dtype="float32")

PAIRS = [("Q: colour of the sky?\nA:", " blue"), ("Q: 2 + 2?\nA:", " four"),
         ("Say hi:", " hello there, friend"), ("Q: name a river\nA:", " the Nile"),
         ("Translate 'chat':", " cat"), ("Q: opposite of up?\nA:", " down")]


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def _prompt_response_file(tmp_path):
  return _write_jsonl(tmp_path / "pairs.jsonl",
                      [{"prompt": p, "response": r} for p, r in PAIRS])


def _all_train_examples(source, ctx_len):
  """Every training example once, in id order (batch 1, one epoch of the shuffled order)."""
  doc, _ = data_pipeline.document_windows(source, ctx_len)
  it = iter(data_pipeline.make_dataset(source, ctx_len, 1, seed=0, val_fraction=0.0))
  return [next(it) for _ in range(len(doc))]


# ---------------------------------------------------------------------------------------------
# Reading JSONL


def test_text_jsonl_gives_one_padded_example_per_document(tmp_path):
  texts = ["first document", "second", "a third, longer document"]
  path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
  source = documents.read_jsonl(path, BYTES)
  assert source.format == "text" and source.num_documents == 3

  examples = _all_train_examples(source, ctx_len=32)
  got = {}  # document text -> (inputs, targets, mask) of its one example
  for e in examples:
    x, y, m = e["inputs"][0], e["targets"][0], e["mask"][0]
    got[bytes(x[x > 0].astype(np.uint8)).decode()] = (x, y, m)
  for text in texts:
    ids = list(text.encode()) + [EOD]
    x, y, m = got[text]
    n = len(ids) - 1  # targets of the document
    np.testing.assert_array_equal(x[:n], ids[:-1])
    np.testing.assert_array_equal(y[:n], ids[1:])
    np.testing.assert_array_equal(m, [1.0] * n + [0.0] * (32 - n))  # padding is not counted
    assert (x[n:] == 0).all() and (y[n:] == 0).all()


def test_prompt_tokens_and_padding_are_masked_and_the_response_ends_the_document(tmp_path):
  source = documents.read_jsonl(_prompt_response_file(tmp_path), BYTES)
  assert source.format == "prompt_response"
  examples = _all_train_examples(source, ctx_len=40)  # every pair fits in one window
  assert len(examples) == len(PAIRS)
  seen = set()
  for e in examples:
    x, y, m = e["inputs"][0], e["targets"][0], e["mask"][0]
    (prompt, response), = [(p, r) for p, r in PAIRS if bytes(x[:len(p)].astype(np.uint8)) ==
                           p.encode()]
    p, r = len(prompt.encode()), len(response.encode())
    # Targets are tokens 1.. of the document: those of the prompt (p - 1), then the response
    # and the end of document, then padding.
    np.testing.assert_array_equal(m, [0.0] * (p - 1) + [1.0] * (r + 1) + [0.0] * (40 - p - r))
    assert bytes(y[m > 0][:-1].astype(np.uint8)).decode() == response
    assert y[m > 0][-1] == EOD
    seen.add(prompt)
  assert len(seen) == len(PAIRS)


def test_a_long_document_is_split_into_windows_whose_targets_tile_it(tmp_path):
  text = "".join(chr(ord("a") + i % 26) for i in range(50))
  source = documents.read_jsonl(_write_jsonl(tmp_path / "long.jsonl", [{"text": text}]), BYTES)
  doc, start = data_pipeline.document_windows(source, ctx_len=16)
  np.testing.assert_array_equal(start, [0, 16, 32, 48])  # 50 targets (49 + end of document)
  windows = data_pipeline._DocumentWindows(source, doc, start, 16).map(np.arange(4))
  targets = windows["targets"][windows["mask"] > 0]
  np.testing.assert_array_equal(targets, list(text.encode()[1:]) + [EOD])
  # Each window starts where the last one's targets ended: no token is lost or seen twice.
  np.testing.assert_array_equal(windows["inputs"][1:, 0], windows["targets"][:-1, -1])


def test_windows_of_a_long_prompt_with_no_response_token_are_dropped(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 40, "response": "yes"}])
  source = documents.read_jsonl(path, BYTES)
  _, start = data_pipeline.document_windows(source, ctx_len=16)
  np.testing.assert_array_equal(start, [32])  # windows at 0 and 16 hold prompt targets only


@pytest.mark.parametrize("lines, line, match", [
    (['{"text": "ok"}', '{"text": "ok"'], 2, r"invalid JSON .* each line must be one JSON object"),
    (['{"prompt": "a", "response": "b"}', '', '{"prompt": "c"}'], 3,
     r"missing field 'response'"),
    (['{"text": "ok"}', '{"body": "no"}'], 2, r"missing field 'text'"),
    (['["a list"]'], 1, r"a JSON list, not an object"),
    (['{"text": 3}'], 1, r"field 'text' is a int, not a string"),
    (['{"content": "x"}'], 1, r"no \"text\" field, nor \"prompt\" and \"response\" fields"),
])
def test_a_bad_line_is_one_error_naming_the_file_and_line(tmp_path, lines, line, match):
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(documents.JsonlError, match=match) as e:
    documents.read_jsonl(path, BYTES)
  message = str(e.value)
  assert message.startswith(f"{path}:{line}: ") and "\n" not in message


def test_a_file_without_documents_is_refused(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_text("\n\n")
  with pytest.raises(documents.JsonlError, match=r"empty.jsonl:1: the file holds no JSON lines"):
    documents.read_jsonl(path, BYTES)


# ---------------------------------------------------------------------------------------------
# The pipeline


def test_validation_holds_every_example_once_and_pads_the_last_batch(tmp_path):
  source = documents.read_jsonl(_prompt_response_file(tmp_path), BYTES)
  val = list(data_pipeline.make_dataset(source, 40, batch_size=4, seed=0, split="val",
                                        val_fraction=0.5))  # the last 3 of 6 documents
  assert len(val) == 1  # 3 examples and one padding row
  rows = [bytes(x[x > 0].astype(np.uint8)) for x in val[0]["inputs"]]
  assert rows[:3] == [(p + r).encode() for p, r in PAIRS[3:]]
  assert rows[3] == b"" and not val[0]["mask"][3].any()
  # The training split holds the other documents only.
  train = data_pipeline.make_dataset(source, 40, batch_size=3, seed=0, val_fraction=0.5)
  firsts = {bytes(x[:8].astype(np.uint8)) for x in next(iter(train))["inputs"]}
  assert firsts == {(p + r).encode()[:8] for p, r in PAIRS[:3]}


def test_host_shards_of_documents_tile_the_global_batch(tmp_path):
  source = documents.read_jsonl(_prompt_response_file(tmp_path), BYTES)
  for split in ("train", "val"):
    whole = next(iter(data_pipeline.make_dataset(source, 40, 4, 0, split=split,
                                                 val_fraction=0.5)))
    parts = [next(iter(data_pipeline.make_dataset(source, 40, 4, 0, split=split,
                                                  val_fraction=0.5, shard_index=i,
                                                  shard_count=2))) for i in range(2)]
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_a_resumed_document_iterator_yields_the_same_batches(tmp_path):
  source = documents.read_jsonl(_prompt_response_file(tmp_path), BYTES)
  it = iter(data_pipeline.make_dataset(source, 40, 2, seed=3, val_fraction=0.0))
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(5)]  # past the end of an epoch: reshuffled
  it2 = iter(data_pipeline.make_dataset(source, 40, 2, seed=3, val_fraction=0.0))
  it2.set_state(json.loads(json.dumps(state)))
  for a, b in zip(want, [next(it2) for _ in range(5)]):
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(a[key], b[key])


def test_train_reads_a_jsonl_file_named_in_the_config(tmp_path):
  path = _prompt_response_file(tmp_path)
  config = tiny_config(path, batch_size=2)
  config.model.ctx_len = 40
  config.data.val_fraction = 0.5
  source = data_sources.open_training_source(config.data, tmp_path, config.model.vocab_size)
  assert isinstance(source, documents.DocumentSource) and source.num_documents == len(PAIRS)
  train_it, val_ds = train_loop.make_datasets(config, source)
  batch = next(train_it)
  assert batch["mask"].shape == batch["inputs"].shape == (2, 40)
  assert batch["mask"].dtype == np.float32 and 0 < batch["mask"].sum() < 80
  assert len(list(val_ds)) == 2


def test_a_bad_line_reaches_train_as_the_same_one_line_error(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "answer": "d"}\n')
  config = tiny_config(path)
  with pytest.raises(documents.JsonlError, match=rf"^{path}:2: missing field 'response'"):
    data_sources.open_training_source(config.data, tmp_path, 256)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
  config = tiny_config(_write_jsonl(tmp_path / "t.jsonl", [{"text": "caf\u00e9 ok"}]))
  with pytest.raises(ValueError, match=r"token ids up to 195 but --config.model.vocab_size=128"):
    data_sources.open_training_source(config.data, tmp_path, 128)


# ---------------------------------------------------------------------------------------------
# The mask through the loss, the step and the metrics


def _model(seed=0):
  graphdef, params = nnx.split(model_lib.RWKV(CFG, rngs=nnx.Rngs(seed)), nnx.Param)
  rng = np.random.default_rng(seed)  # every parameter non-zero: the official init zeroes some
  return graphdef, jax.tree.map(
      lambda p: p + 0.3 * rng.standard_normal(p.shape).astype(np.float32), params)


def _document_batch(tmp_path, batch_size=4, ctx_len=24):
  source = documents.read_jsonl(_prompt_response_file(tmp_path), BYTES)
  it = iter(data_pipeline.make_dataset(source, ctx_len, batch_size, seed=1, val_fraction=0.0))
  return {k: jnp.asarray(v) for k, v in next(it).items()}


def test_the_masked_loss_is_the_loss_of_the_response_tokens_by_hand(tmp_path):
  graphdef, params = _model()
  batch = _document_batch(tmp_path)
  loss, metrics = bptt.window_loss(graphdef, params, batch["inputs"], batch["targets"],
                                   batch["mask"], impl="scan")

  logits, _ = nnx.merge(graphdef, params)(batch["inputs"], impl="scan")
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  nll, hits = [], []
  for i, j in zip(*np.nonzero(np.asarray(batch["mask"]))):
    target = int(batch["targets"][i, j])
    nll.append(-float(logp[i, j, target]))
    hits.append(int(np.argmax(logits[i, j])) == target)
  assert 0 < len(nll) < batch["mask"].size
  assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(np.mean(nll), rel=1e-5)
  assert float(metrics["accuracy"]) == pytest.approx(np.mean(hits), abs=1e-6)
  assert float(metrics["num_tokens"]) == len(nll)
  # What the mask leaves out does not move the loss: change every uncounted target.
  targets = jnp.where(batch["mask"] > 0, batch["targets"], (batch["targets"] + 7) % 256)
  other, _ = bptt.window_loss(graphdef, params, batch["inputs"], targets, batch["mask"],
                              impl="scan")
  assert float(other) == float(loss)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "truncated"])
def test_a_masked_window_in_chunks_gives_the_one_call_loss(tmp_path, mode):
  graphdef, params = _model(1)
  batch = _document_batch(tmp_path)
  args = (batch["inputs"], batch["targets"], batch["mask"])
  grad = jax.jit(jax.value_and_grad(
      lambda p, chunk_len: bptt.window_loss(graphdef, p, *args, chunk_len=chunk_len, bptt=mode,
                                            impl="scan"), has_aux=True), static_argnums=1)
  (want, want_m), want_g = grad(params, 0)
  (got, got_m), got_g = grad(params, 7)  # chunks of 7, 7, 7 and 3: some hold no response
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  for name in ("loss", "accuracy", "num_tokens"):
    assert float(got_m[name]) == pytest.approx(float(want_m[name]), rel=1e-6), name
  if mode == "full":  # the same gradients as one call; truncated ones differ by design
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                         atol=2e-5 * np.abs(b).max()),
                 got_g, want_g)


@pytest.mark.slow
def test_a_masked_step_with_accumulation_is_the_whole_batch_step(tmp_path):
  config = tiny_config(tmp_path / "unused", batch_size=4)
  config.model.update(n_layer=1, n_embd=16, ctx_len=24)
  batch = {k: np.asarray(v) for k, v in _document_batch(tmp_path).items()}
  # The two micro-batches count different numbers of targets: a plain average would differ.
  counts = batch["mask"].reshape(2, 2, -1).swapaxes(0, 1).sum(axis=(1, 2))
  assert counts[0] != counts[1]
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  results = []
  for k in (1, 2):
    tx, _ = step_lib.build_optimizer(config)
    state = step_lib.init_state(config, mesh, tx)
    step = step_lib.make_train_step(state, tx, mesh, accumulate_steps=k, l2wrap=1e-4,
                                    impl="scan")
    params, _, metrics = step(state.params, state.opt_state, sharding.shard_batch(mesh, batch))
    results.append((jax.device_get(metrics), jax.device_get(nnx.to_pure_dict(params))))
  (whole, whole_params), (accumulated, accumulated_params) = results
  for name in ("loss", "accuracy", "num_tokens", "grad_norm"):
    assert accumulated[name] == pytest.approx(whole[name], rel=1e-5), name
  assert whole["num_tokens"] == batch["mask"].sum()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               accumulated_params, whole_params)

  state = step_lib.init_state(config, mesh, tx)  # the steps donated the others' buffers
  eval_step = step_lib.make_eval_step(state, mesh, "scan")
  masked_sum, masked_count = map(float, eval_step(state.params, sharding.shard_batch(mesh, batch)))
  unmasked_sum, unmasked_count = map(float, eval_step(state.params, sharding.shard_batch(
      mesh, {k: v for k, v in batch.items() if k != "mask"})))
  logits, _ = nnx.merge(state.graphdef, state.params)(jnp.asarray(batch["inputs"]), impl="scan")
  by_hand = losses.cross_entropy(logits, jnp.asarray(batch["targets"]),
                                 jnp.asarray(batch["mask"]))
  assert masked_count == batch["mask"].sum() and unmasked_count == batch["mask"].size
  assert masked_sum / masked_count == pytest.approx(float(by_hand), rel=1e-6)
  assert unmasked_sum / unmasked_count == pytest.approx(
      float(losses.cross_entropy(logits, jnp.asarray(batch["targets"]))), rel=1e-6)

  # Validation weighs each batch by the targets it counts: two batches counting 1 and all of
  # their targets give the mean over every counted target, not the mean of the two means.
  one = dict(batch, mask=np.zeros_like(batch["mask"]))
  one["mask"][0, 0] = 1
  full = dict(batch, mask=np.ones_like(batch["mask"]))
  got = train_loop.evaluate(eval_step, state.params, [one, full], mesh, max_batches=0)
  nll = np.asarray(losses.token_losses(logits, jnp.asarray(batch["targets"])))
  want = (nll[0, 0] + nll.sum()) / (1 + nll.size)
  assert got == pytest.approx(float(want), rel=1e-5)
  assert abs(got - (nll[0, 0] + nll.mean()) / 2) > 1e-3  # what a mean of means would give


# ---------------------------------------------------------------------------------------------
# Through the fine-tuning runner


@pytest.fixture(name="tiny_base")
def _tiny_base(tmp_path):
  path = tmp_path / "tiny.pth"
  formats.save_pth(random_model(CFG), path)
  return path


@pytest.mark.slow
def test_lora_fine_tuning_reads_prompt_response_jsonl_and_validates_on_held_out_pairs(
    tmp_path, tiny_base):
  data = _write_jsonl(tmp_path / "pairs.jsonl",
                      [{"prompt": p, "response": r} for p, r in PAIRS * 4])
  config = finetune.default_config()
  config.data.update(path=str(data), tokenizer="bytes", val_fraction=0.25)
  config.model.ctx_len = 40
  config.optim.update(warmup_steps=1)
  config.train.update(steps=3, batch_size=8, log_every=1, eval_every=3, eval_batches=0,
                      checkpoint_every=3, progress_bar=False)
  result = finetune.train(config, tmp_path / "run", base=str(tiny_base))

  assert np.isfinite(result["train/loss"]) and np.isfinite(result["val/loss"])
  assert [r["step"] for r in metrics_lib.read_history(tmp_path / "run")
          if "train/loss" in r] == [1, 2, 3]
  assert (tmp_path / "run" / "adapters").is_dir()


@pytest.mark.slow
def test_the_finetune_runner_names_the_file_and_line_of_a_bad_record(tmp_path, tiny_base):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "answer": "d"}\n')
  result = subprocess.run(
      [sys.executable, "-m", "experiments.finetune", f"--base={tiny_base}",
       "--config=experiments/configs/finetune.py", f"--workdir={tmp_path / 'run'}",
       f"--config.data.path={bad}", "--config.data.tokenizer=bytes"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert one_line_error(result) == (
      f"error: {bad}:2: missing field 'response'; every line of a prompt_response file needs "
      f"'prompt' and 'response' (the first record set the format).")
