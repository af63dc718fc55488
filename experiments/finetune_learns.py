r"""Does fine-tuning learn a new domain? The demo model adapted to Python source code.

  python -m experiments.finetune_learns [--workdir=/tmp/rwkv_claims] [--base=EXPORT]
      [--base_steps=800] [--steps=200] [--modes=lora,state,full] [--state_lr=1.0]

The base is the demo's model (experiments/configs/char_tiny.py: bytes, trained on the English
Wikipedia sample), trained into WORKDIR/finetune_learns/base once unless --base names an export.
The new domain is the Python source of the `absl` package installed here: its .py files in
sorted order, every fifth file held out, the rest joined into a text file. Each mode of --modes
fine-tunes the same base for --steps steps (rwkv_jax/train/finetune.py) in its own directory.
The base and every fine-tuned model are scored, in bits per byte, on the held-out code and on
the demo's held-out English (the start of its validation part): windows of 1024 bytes, each from
the model's initial state (the learned one in the state modes), up to --eval_bytes of each.
Writes experiments/results/finetune_learns_<tag>.json and .png. Re-running resumes unfinished
runs.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from typing import Any, Sequence

from absl import flags

from experiments import _runs, benchlib, plots

NAME = "finetune_learns"
PACKAGE = "absl"
MODES = ("full", "lora", "state", "lora+state")


def base_config(steps: int, tiny: bool = False):
  """The demo's training config (char_tiny); `tiny`: seconds on a CPU, for tests."""
  from experiments.configs import char_tiny  # pylint: disable=g-import-not-at-top
  c = char_tiny.get_config()
  c.train.steps = steps
  c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 4)
  if tiny:
    c.model.update(n_layer=1, n_embd=32, ctx_len=32)
    c.train.update(batch_size=8, log_every=1, eval_every=steps, eval_batches=1,
                   checkpoint_every=steps, async_checkpoints=False)
  return c


def finetune_config(mode: str, lr: float, steps: int, train_text: pathlib.Path, ctx_len: int,
                    batch_size: int, r: int, tiny: bool = False):
  from rwkv_jax.train import finetune  # pylint: disable=g-import-not-at-top
  c = finetune.default_config()
  c.finetune.update(mode=mode, r=r, lora_alpha=2.0 * r)
  c.data.update(source="file", path=str(train_text), tokenizer="bytes", val_fraction=0.05)
  c.model.ctx_len = ctx_len
  c.optim.update(lr_init=lr, lr_final=lr / 10, warmup_steps=min(10, steps // 4))
  c.train.update(steps=steps, batch_size=batch_size, log_every=max(1, steps // 20),
                 eval_every=steps, eval_batches=4, checkpoint_every=steps)
  if tiny:
    c.train.update(eval_batches=1, async_checkpoints=False)
  return c


def code_split(workdir: pathlib.Path, held_out_every: int) -> dict[str, Any]:
  """Writes the package's .py files, split by file, as WORKDIR/code/{train,held_out}.txt."""
  import importlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(importlib.import_module(PACKAGE).__file__).parent
  paths = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
  held = [p for i, p in enumerate(paths) if i % held_out_every == held_out_every - 1]
  train = [p for p in paths if p not in held]
  out = workdir / "code"
  out.mkdir(parents=True, exist_ok=True)
  texts = {}
  for name, part in (("train", train), ("held_out", held)):
    texts[name] = b"\n".join(p.read_bytes() for p in part)
    (out / f"{name}.txt").write_bytes(texts[name])
  return {"package": PACKAGE, "root": str(root), "train_files": len(train),
          "held_out_files": [str(p.relative_to(root)) for p in held],
          "train_bytes": len(texts["train"]), "held_out_bytes": len(texts["held_out"]),
          "train_path": out / "train.txt", "held_out_path": out / "held_out.txt"}


def bits_per_byte(model, data, window: int, max_bytes: int) -> float:
  """Mean bits per byte over windows of `window` bytes of `data` (each from the initial
  state), at most `max_bytes` of it."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rwkv_jax.infer import scoring  # pylint: disable=g-import-not-at-top
  data = np.asarray(data[:max_bytes], np.int32)
  windows = [data[i:i + window] for i in range(0, len(data) - 1, window)]
  windows = [w for w in windows if len(w) >= 2]
  losses = scoring.batch_token_losses(model, windows, chunk=window)
  total = sum(float(np.sum(x, dtype=np.float64)) for x in losses)
  return total / math.log(2) / sum(len(x) for x in losses)


def run(workdir: str | pathlib.Path, *, base: str | None = None, base_steps: int = 800,
        steps: int = 200, modes: Sequence[str] = ("lora", "state", "full"),
        lrs: dict[str, float] | None = None, batch_size: int = 8, r: int = 8,
        held_out_every: int = 5, eval_window: int = 1024, eval_bytes: int = 65536,
        tiny: bool = False) -> dict[str, Any]:
  """Trains (or reads) the base, fine-tunes it in each mode and returns the record."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rwkv_jax.data import corpus  # pylint: disable=g-import-not-at-top
  from rwkv_jax.data import pipeline as data_pipeline  # pylint: disable=g-import-not-at-top
  from rwkv_jax.io import checkpoint, weights  # pylint: disable=g-import-not-at-top
  from rwkv_jax.train import finetune, metrics  # pylint: disable=g-import-not-at-top

  lrs = {"full": 5e-4, "lora": 2e-3, "state": 1.0, "lora+state": 2e-3, **(lrs or {})}
  workdir = pathlib.Path(workdir).absolute()
  config = base_config(base_steps, tiny)
  start = time.perf_counter()
  if base is None:
    # A finished base is used as it is: training it again would rewrite its export, and the
    # fine-tuning runs, which record its digest, would refuse to resume on it.
    if not (workdir / "base" / "export" / checkpoint.EXPORT_MARKER).is_file():
      _runs.train(config, workdir / "base")
    base = str(workdir / "base" / "export")
  base_s = time.perf_counter() - start
  model, base_rwkv = weights.load(base, dtype="float32")
  ctx_len = config.model.ctx_len

  code = code_split(workdir, held_out_every)
  held_code = np.frombuffer(code["held_out_path"].read_bytes(), np.uint8)
  wiki = np.memmap(corpus.wiki_sample(), dtype=np.uint8, mode="r")
  split = data_pipeline.split_stream(len(wiki), ctx_len, config.data.val_fraction)
  english = wiki[split.train_end:]

  def score(m) -> dict[str, float]:
    return {"code_bits_per_byte": bits_per_byte(m, held_code, eval_window, eval_bytes),
            "english_bits_per_byte": bits_per_byte(m, english, eval_window, eval_bytes)}

  base_scores = score(model)
  del model
  results = []
  for mode in modes:
    run_dir = workdir / mode.replace("+", "_")
    ft = finetune_config(mode, lrs[mode], steps, code["train_path"], ctx_len, batch_size, r,
                         tiny)
    t0 = time.perf_counter()
    loop_config, hooks = finetune.prepare(ft, run_dir, base)
    _runs.train(loop_config, run_dir, **hooks)
    wall_s = time.perf_counter() - t0
    if mode == "full":
      tuned, _ = weights.load(run_dir / finetune.EXPORT_DIR, dtype="float32")
    else:
      tuned, _ = weights.load(base, dtype="float32", adapters=run_dir / finetune.ADAPTERS_DIR)
    scores = score(tuned)
    history = metrics.read_history(run_dir)
    results.append({
        "mode": mode, "lr": lrs[mode], **scores,
        "code_delta": scores["code_bits_per_byte"] - base_scores["code_bits_per_byte"],
        "english_delta": scores["english_bits_per_byte"] - base_scores["english_bits_per_byte"],
        "wall_s": wall_s,
        "train_curve": [(x["step"], x["train/loss_avg"] / math.log(2)) for x in history
                        if "train/loss_avg" in x]})
  settings = {
      "base": base, "base_model": base_rwkv.to_dict(), "base_steps": base_steps,
      "base_train_s": base_s, "steps": steps, "batch_size": batch_size, "ctx_len": ctx_len,
      "lora_r": r, "lora_alpha": 2.0 * r, "eval_window": eval_window, "eval_bytes": eval_bytes,
      "code": {k: v for k, v in code.items() if not k.endswith("_path")},
      "english": f"{corpus.wiki_sample().name} from byte {split.train_end} (the demo's "
                 f"validation part)"}
  return {"benchmark": NAME, "environment": benchlib.environment(sys.argv), "settings": settings,
          "base": base_scores, "results": results}


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = ["base"] + [x["mode"] for x in record["results"]]
  rows = [record["base"]] + record["results"]
  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.38
  for k, (key, label) in enumerate((("code_bits_per_byte", f"held-out {PACKAGE} code"),
                                    ("english_bits_per_byte", "held-out English"))):
    xs = [i + (k - 0.5) * width for i in range(len(rows))]
    bars = ax.bar(xs, [x[key] for x in rows], width, label=label)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
  ax.set_xticks(range(len(rows)), names)
  ax.set_ylabel("bits per byte")
  s = record["settings"]
  ax.set_title(f"fine-tuning the demo model on Python code: {s['steps']} steps each")
  ax.legend()
  plots.save_figure(fig, path)


def _define_flags() -> None:
  _runs.define_flags(NAME, "gpu_gpu_h100")
  flags.DEFINE_string("base", None, "An export to start from; default: train the demo's model "
                      "into WORKDIR/finetune_learns/base.")
  flags.DEFINE_integer("base_steps", 800, "Training steps of the base (the demo's 800).")
  flags.DEFINE_integer("steps", 200, "Fine-tuning steps of each mode.")
  flags.DEFINE_list("modes", ["lora", "state", "full"], f"Any of {', '.join(MODES)}.")
  flags.DEFINE_float("lora_lr", 2e-3, "Peak learning rate of lora and lora+state.")
  flags.DEFINE_float("state_lr", 1.0, "Peak learning rate of state: a few vectors per layer "
                     "move little at LoRA's rates (2e-2 left the held-out loss where it was).")
  flags.DEFINE_float("full_lr", 5e-4, "Peak learning rate of full.")
  flags.DEFINE_integer("eval_bytes", 65536, "Bytes of each held-out text scored.")


def main(argv):
  del argv
  from experiments._cli import UsageError  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  out = _runs.start()
  if bad := [m for m in f.modes if m not in MODES]:
    raise UsageError(f"--modes: {bad} not among {', '.join(MODES)}.")
  lrs = {"full": f.full_lr, "lora": f.lora_lr, "lora+state": f.lora_lr, "state": f.state_lr}
  record = run(pathlib.Path(f.workdir) / NAME, base=f.base, base_steps=f.base_steps,
               steps=f.steps, modes=f.modes, lrs=lrs, eval_bytes=f.eval_bytes)
  path = _runs.save_record(NAME, record, out, f.tag or _runs.default_tag("cpu"), plot)
  print(f"base: code {record['base']['code_bits_per_byte']:.3f}, English "
        f"{record['base']['english_bits_per_byte']:.3f} bits per byte")
  for x in record["results"]:
    print(f"{x['mode']}: code {x['code_bits_per_byte']:.3f} ({x['code_delta']:+.3f}), English "
          f"{x['english_bits_per_byte']:.3f} ({x['english_delta']:+.3f})")
  print(f"results: {path}")


if __name__ == "__main__":
  _define_flags()
  _runs.run_cli(main)
