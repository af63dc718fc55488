r"""What a new user waits for: the wall time and peak memory of a runner's first and second run,
and of the rwkv package's same job, each in a fresh process.

  python -m experiments.bench_coldstart            # 169M and L6-D256 generate, score, train
  python -m experiments.bench_coldstart --quick    # a tiny shape, one repeat (the tests' check)

Jobs: `experiments.generate` (a 100-token prompt, 32 greedy tokens) on the 169M and L6-D256
shapes, `experiments.score` (a text of a few hundred tokens) on the first shape, and the first
step of `experiments.train` with the char_tiny config. The weights are random, in the official
.pth format, written once to CACHE/bench_coldstart/. Each job runs as

  cold      the command with an empty compilation cache (rwkv_jax.compile_cache), as on a new
            machine;
  warm      the same command again, loading what the cold run compiled;
  package   the same job with the rwkv package (`strategy="cpu fp32"`, TorchScript on, as ChatRWKV
            runs it), for generate and score (it does not train).

each in its own process, `--repeats` times in turns. The wall time is the process's from start to
exit (imports, loading, compiling and the work); the peak memory is its peak resident set
(`wait4`'s ru_maxrss). From JAX's compile log (JAX_LOG_COMPILES=1), each run records the
programs it compiled and those it loaded from the cache, and how many hold the model.

Writes experiments/results/bench_coldstart_<device>.json and .png: the environment (device,
versions, date, command), every run, the medians and their ratios to the package's.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Sequence

import numpy as np
from absl import flags

from experiments import _cli, benchlib, plots

_REPO = pathlib.Path(__file__).resolve().parents[1]

flags.DEFINE_bool("quick", False, "A tiny shape and one repeat: checks that everything runs.")
flags.DEFINE_list("jobs", ["generate", "score", "train"], "Which jobs: generate, score, train.")
flags.DEFINE_integer("repeats", 3, "Runs of each kind per job (--quick: 1).", lower_bound=1)
flags.DEFINE_string("out", None, "JSON path; default experiments/results/"
                    "bench_coldstart_<device>.json (and the .png beside it).")
FLAGS = flags.FLAGS

PILE_VOCAB = 50277
# name -> (n_layer, n_embd); dim_ffn = 4 * n_embd, vocab PILE_VOCAB (the neox tokenizer's).
SHAPES = {"169m": (12, 768), "L6_D256": (6, 256)}
QUICK_SHAPES = {"L2_D64": (2, 64)}
PROMPT_TOKENS, NEW_TOKENS = 100, 32
SCORE_WORDS = 300  # 361 neox tokens
TRAIN_CONFIG = "experiments/configs/char_tiny.py"
TRAIN_QUICK = ("--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.ctx_len=16",
               "--config.train.batch_size=2")
# Where a job's time goes over the package's, beyond which it misses (the generate targets).
TARGETS = {"cold_wall_over_package": 1.5, "warm_wall_over_package": 0.7,
           "peak_rss_over_package": 1.3}
_TIMEOUT_S = 1800

# The rwkv package's jobs, run as `python -c`: only what the package itself needs is imported.
_PACKAGE_PRELUDE = """
import json, os, sys
os.environ["RWKV_JIT_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"
import contextlib, io
from rwkv.model import RWKV
args = json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):  # it prints every tensor it loads
  model = RWKV(model=args["checkpoint"], strategy="cpu fp32")
"""
PACKAGE_GENERATE = _PACKAGE_PRELUDE + """
out, state = model.forward(args["prompt"], None)
tokens = []
for _ in range(args["max_tokens"]):
  tokens.append(int(out.argmax()))
  out, state = model.forward([tokens[-1]], state)
print(json.dumps({"tokens": tokens}))
"""
PACKAGE_SCORE = _PACKAGE_PRELUDE + """
import torch
from tokenizers import Tokenizer
ids = Tokenizer.from_file(args["tokenizer"]).encode(open(args["text_file"]).read()).ids
logits, _ = model.forward(ids[:-1], None, full_output=True)
losses = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none")
print(json.dumps({"tokens_scored": len(ids) - 1, "mean_loss": float(losses.mean())}))
"""


# ----------------------------------------------------------------------------------------------
# The jobs.

def checkpoint(shape: str, n_layer: int, n_embd: int) -> pathlib.Path:
  """Random weights of the shape as an official float32 .pth, written once to the cache."""
  from rwkv_jax import files

  path = files.cache_dir() / "bench_coldstart" / f"random_{shape}_L{n_layer}_D{n_embd}.pth"
  if not path.is_file():
    import torch  # pylint: disable=g-import-not-at-top

    from experiments import reference_models
    sd = reference_models.official_state_dict(0, n_layer=n_layer, n_embd=n_embd, dim_att=n_embd,
                                              dim_ffn=4 * n_embd, vocab=PILE_VOCAB)
    with files.atomic_path(path) as tmp:
      torch.save(sd, tmp)
  return path


def prompt() -> list[int]:
  return np.random.default_rng(0).integers(0, PILE_VOCAB, PROMPT_TOKENS).tolist()


def score_text(directory: pathlib.Path) -> pathlib.Path:
  """A fixed text of SCORE_WORDS English words, one sentence a line."""
  words = ("the of and to in a is that for it as was with be by on not he this are or his from "
           "at which but have an they you were her she there been one all we their has would "
           "when if so no what up out who them some more can river city north king music early "
           "second water between known during after people under years large history").split()
  rng = np.random.default_rng(1)
  lines, count = [], 0
  while count < SCORE_WORDS:
    n = int(rng.integers(5, 15))
    lines.append(" ".join(rng.choice(words, n)).capitalize() + ".")
    count += n
  path = directory / "score.txt"
  path.write_text("\n".join(lines) + "\n")
  return path


def jobs(names: Sequence[str], quick: bool, directory: pathlib.Path) -> list[dict[str, Any]]:
  """Each job: its name, shape, command, the package's command (or None) and model marker."""
  from rwkv_jax.data import assets

  shapes = QUICK_SHAPES if quick else SHAPES
  python = sys.executable
  out = []
  for kind in names:
    if kind == "generate":
      for shape, (n_layer, n_embd) in shapes.items():
        path = checkpoint(shape, n_layer, n_embd)
        ids = prompt()
        out.append({
            "name": f"generate_{shape}", "kind": "generate",
            "shape": [n_layer, n_embd, PILE_VOCAB],
            "command": [python, "-m", "experiments.generate", f"--checkpoint={path}",
                        f"--prompt_tokens={','.join(map(str, ids))}",
                        f"--max_tokens={NEW_TOKENS}", "--temperature=0", "--nostop_at_eos",
                        "--output={workdir}/tokens.json"],
            "package_command": [python, "-c", PACKAGE_GENERATE, json.dumps(
                {"checkpoint": str(path), "prompt": ids, "max_tokens": NEW_TOKENS})],
            "model_marker": f"float32[{n_embd},{4 * n_embd}]", "n_layer": n_layer})
    elif kind == "score":
      shape, (n_layer, n_embd) = next(iter(shapes.items()))
      path, text = checkpoint(shape, n_layer, n_embd), score_text(directory)
      out.append({
          "name": f"score_{shape}", "kind": "score", "shape": [n_layer, n_embd, PILE_VOCAB],
          "command": [python, "-m", "experiments.score", f"--checkpoint={path}",
                      f"--text_file={text}", "--tokenizer=neox"],
          "package_command": [python, "-c", PACKAGE_SCORE, json.dumps(
              {"checkpoint": str(path), "text_file": str(text),
               "tokenizer": str(assets.neox_tokenizer_json())})],
          "model_marker": f"float32[{n_embd},{4 * n_embd}]", "n_layer": n_layer})
    elif kind == "train":
      n_layer, n_embd = (1, 32) if quick else (4, 192)  # char_tiny's shape
      out.append({
          "name": "train_char_tiny" + ("_quick" if quick else ""), "kind": "train",
          "shape": [n_layer, n_embd, 256],
          "command": [python, "-m", "experiments.train", f"--config={TRAIN_CONFIG}",
                      "--workdir={workdir}", "--config.train.steps=1",
                      "--config.optim.warmup_steps=0",
                      *(TRAIN_QUICK if quick else ())],
          "package_command": None,
          "model_marker": f"float32[{n_embd},{4 * n_embd}]", "n_layer": n_layer})
    else:
      raise _cli.UsageError(f"--jobs: unknown job {kind!r}; choose from generate, score, train.")
  return out


def _env(compile_cache: str) -> dict[str, str]:
  return dict(os.environ, RWKV_JAX_COMPILE_CACHE=compile_cache, JAX_LOG_COMPILES="1")


_LOSS = re.compile(r"tokens scored: (\d+).*\nloss: ([\d.]+) nats/token")


def _record(result: benchlib.ProcessRun, job: dict[str, Any], workdir: pathlib.Path | None
            ) -> dict[str, Any]:
  """A run's record: wall time, peak memory, what it computed ("result": the tokens generated,
  or the tokens scored and their mean loss) and, for rwkv_jax's runs (those with a workdir), the
  programs it compiled."""
  record = {"wall_s": result.wall_s, "peak_rss_bytes": result.peak_rss_bytes,
            "returncode": result.returncode}
  if result.returncode:
    record["error"] = result.stderr[-2000:]
    return record
  if workdir is None:  # the package's: its last line
    record["result"] = json.loads(result.stdout.splitlines()[-1])
    return record
  if job["kind"] == "generate":
    record["result"] = {"tokens": json.loads((workdir / "tokens.json").read_text())[0]}
  elif job["kind"] == "score" and (match := _LOSS.search(result.stdout)):
    record["result"] = {"tokens_scored": int(match[1]), "mean_loss": float(match[2])}
  record["programs"] = benchlib.compiled_programs(result.stderr, job["model_marker"],
                                                 job["n_layer"])
  return record


def measure(job: dict[str, Any], repeats: int, scratch: pathlib.Path) -> dict[str, Any]:
  """The job's cold, warm and package runs, `repeats` of each in turns."""
  runs = {"cold": [], "warm": [], "package": []}
  for i in range(repeats):
    if job["package_command"] is not None:
      result = benchlib.run_process(job["package_command"], timeout_s=_TIMEOUT_S)
      runs["package"].append(_record(result, job, None))
    cache = scratch / f"xla_{job['name']}_{i}"
    for kind in ("cold", "warm"):
      workdir = scratch / f"workdir_{job['name']}_{i}_{kind}"
      command = [a.replace("{workdir}", str(workdir)) for a in job["command"]]
      result = benchlib.run_process(command, _env(str(cache)), timeout_s=_TIMEOUT_S)
      runs[kind].append(_record(result, job, workdir))
      shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    print(f"{job['name']} {i + 1}/{repeats}: " + ", ".join(
        f"{kind} {r[-1]['wall_s']:.1f} s {r[-1]['peak_rss_bytes'] / 2**30:.2f} GiB"
        for kind, r in runs.items() if r), flush=True)
  shown = dict(job)
  if job["package_command"] is not None:  # the code by its name in this file, not in full
    python, _, code, args = job["package_command"]
    name = next(k for k, v in globals().items() if k.startswith("PACKAGE_") and v == code)
    shown["package_command"] = [python, "-c", f"<experiments.bench_coldstart.{name}>", args]
  return {**shown, "runs": runs, "summary": summary(runs)}


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """Medians of each kind of run, their ratios to the package's, and whether both computed the
  same."""
  out = {}
  for kind, rs in runs.items():
    ok = [r for r in rs if not r["returncode"]]
    if ok:
      out[f"{kind}_wall_s"] = benchlib.median([r["wall_s"] for r in ok])
      out[f"{kind}_peak_rss_bytes"] = benchlib.median([r["peak_rss_bytes"] for r in ok])
  if "package_wall_s" in out:
    for kind in ("cold", "warm"):
      if f"{kind}_wall_s" in out:
        out[f"{kind}_wall_over_package"] = out[f"{kind}_wall_s"] / out["package_wall_s"]
        out[f"{kind}_peak_rss_over_package"] = (out[f"{kind}_peak_rss_bytes"]
                                                / out["package_peak_rss_bytes"])
    out["peak_rss_over_package"] = max(out.get("cold_peak_rss_over_package", 0),
                                       out.get("warm_peak_rss_over_package", 0))
    out["targets_met"] = {name: out[name] <= limit for name, limit in TARGETS.items()
                          if name in out}
    ours = [r.get("result") for kind in ("cold", "warm") for r in runs[kind]]
    theirs = [r.get("result") for r in runs["package"]]
    if all(ours + theirs):
      if "tokens" in theirs[0]:  # greedy: the same tokens
        out["same_tokens_as_package"] = all(r["tokens"] == theirs[0]["tokens"] for r in ours)
      else:  # the same mean loss, to the 4 decimals the runner prints
        out["loss_minus_package"] = max(abs(r["mean_loss"] - theirs[0]["mean_loss"]) for r in ours)
        out["same_tokens_scored"] = all(r["tokens_scored"] == theirs[0]["tokens_scored"]
                                        for r in ours)
  return out


def _warm_up(all_jobs: list[dict[str, Any]]) -> None:
  """Reads the checkpoints and imports the libraries once, untimed: every timed run then finds
  them in the page cache (and Python's bytecode written), as a user's second day would."""
  for job in all_jobs:
    for arg in job["command"]:
      if arg.startswith("--checkpoint="):
        with open(arg.split("=", 1)[1], "rb") as f:
          while f.read(1 << 24):
            pass
  subprocess.run([sys.executable, "-c", "import jax, flax.nnx, torch, rwkv.model, tokenizers, "
                  "rwkv_jax.infer.sampling, rwkv_jax.io.weights"], cwd=_REPO, check=False,
                 capture_output=True, env=dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON="0"))


def run(names: Sequence[str], quick: bool, repeats: int) -> dict[str, Any]:
  """Measures every job; returns the record (without the environment)."""
  load = os.getloadavg()[0]  # other work on the machine slows every run
  with tempfile.TemporaryDirectory(prefix="bench_coldstart_") as tmp:
    scratch = pathlib.Path(tmp)
    all_jobs = jobs(names, quick, scratch)
    _warm_up(all_jobs)
    results = [measure(job, repeats, scratch) for job in all_jobs]
  return {"benchmark": "coldstart", "quick": quick, "repeats": repeats,
          "host_load_average_1m_at_start": load,
          "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "targets": TARGETS,
          "jobs": results}


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  kinds = (("cold", "first run (empty cache)"), ("warm", "second run"), ("package", "rwkv package"))
  # A job kept from an earlier run (`_keep_other_jobs`) is marked with a star.
  names = [j["name"] + (" *" if "environment" in j else "") for j in record["jobs"]]
  x = np.arange(len(names))
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, (kind, label) in enumerate(kinds):
    walls = [j["summary"].get(f"{kind}_wall_s", np.nan) for j in record["jobs"]]
    rss = [j["summary"].get(f"{kind}_peak_rss_bytes", np.nan) / 2**30 for j in record["jobs"]]
    ax_t.bar(x + (i - 1) * 0.27, walls, 0.27, label=label)
    ax_m.bar(x + (i - 1) * 0.27, rss, 0.27, label=label)
  for ax, title in ((ax_t, "wall time of the process (s)"), (ax_m, "peak resident memory (GiB)")):
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
  env = record["environment"]
  load = record.get("host_load_average_1m_at_start")
  fig.suptitle(f"cold start, fresh processes, median of {record['repeats']}; "
               f"{env['device_kind']} x{env['host_cpu_count']} cores, jax {env['jax']}; host load "
               f"average {'' if load is None else f'{load:.1f} at the start, '}"
               f"{env['host_load_average_1m']:.1f} at the end"
               + ("; * measured in an earlier run"
                  if any("environment" in j for j in record["jobs"]) else ""), fontsize=9)
  plots.save_figure(fig, path)


def _keep_other_jobs(path: pathlib.Path, record: dict[str, Any]) -> dict[str, Any]:
  """The record, with the jobs of the one already at `path` that this run did not measure (so
  that --jobs=generate replaces only generate's figures); each kept job carries the environment
  (date, commit, machine load) it was measured in."""
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError):
    return record
  if not isinstance(old, dict) or old.get("quick") != record["quick"]:
    return record
  measured = {job["name"] for job in record["jobs"]}
  earlier = dict(old.get("environment", {}),
                 host_load_average_1m_at_start=old.get("host_load_average_1m_at_start"))
  kept = [{**job, "environment": job.get("environment", earlier)}
          for job in old.get("jobs", []) if job.get("name") not in measured]
  return {**record, "jobs": record["jobs"] + kept}


def main(argv):
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = _cli.output_path("out", FLAGS.out)
  repeats = 1 if FLAGS.quick else FLAGS.repeats
  record = run(FLAGS.jobs, FLAGS.quick, repeats)
  record = {"environment": benchlib.environment(), **record}
  path = out or _REPO / "experiments" / "results" / f"bench_coldstart_{benchlib.default_tag()}.json"
  record = _keep_other_jobs(path, record)
  benchlib.write_json(path, record)
  plot(record, path.with_suffix(".png"))
  for job in record["jobs"]:
    print(job["name"], json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                   for k, v in job["summary"].items()}))
  print(f"Wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
  _cli.run(main)
