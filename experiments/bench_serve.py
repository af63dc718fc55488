r"""Benchmarks the OpenAI-compatible server (experiments.serve) with concurrent streaming clients.

    python -m experiments.bench_serve                 # throughput and the prefix cache
    python -m experiments.bench_serve --soak          # 500 requests from 32 clients, checked

The server runs in its own process on 127.0.0.1, serving a model with random weights in the
official .pth format (experiments.bench_decode.weights_path, --model, Pile vocabulary); the
clients are threads sending raw HTTP (httpx) and timing each server-sent event.
  * throughput: for each --clients count, every client sends --requests_per_client streaming
    completions one after another (prompts of --prompt_tokens random ids, --max_tokens new
    tokens each, end-of-text ignored, so each makes exactly that many). Reported: aggregate
    tokens/s (all tokens / wall time), time to first token (TTFT: request sent -> first text),
    and inter-token latency (ITL: a request's time from first to last token over its tokens
    - 1), medians and p99 over requests.
  * prefix: TTFT of prompts of --prefix_tokens + --suffix_tokens tokens, cold (a new prefix every
    time) and cached (a shared prefix the server has seen once before, each suffix new).
  * soak (--soak, instead of the above): --soak_requests from --soak_clients, random prompt
    lengths and max_tokens, streamed or not; a tenth of them cancelled mid-stream (the client
    leaves after two events), a tenth malformed (bad JSON, an unknown model, a parameter out of
    range, a prompt over the limit, a body over the limit). Checked: no 5xx, every other answer
    the expected one, every slot and the queue free at the end, and the server's resident memory
    (VmRSS) after the first --soak_warmup requests against the end.
Targets (reported, not asserted): see TARGETS.

Writes <out>/bench_serve_<tag>.json and .png (or bench_serve_soak_<tag>.json and .png).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from absl import flags

from experiments import _cli

_REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_NAME = "rwkv-bench"
TARGETS = (
    # (name, measured, relative to, minimum ratio)
    ("16 clients vs 1: aggregate tokens/s", "tokens_per_s@16", "tokens_per_s@1", 4.0),
    ("cold vs cached 2000-token prefix: time to first token", "ttft_cold", "ttft_cached", 10.0),
)
RSS_GROWTH_LIMIT = 0.10


def define_flags() -> None:
  """Defines the flags; only when run as a program, so that tests can import the helpers."""
  flags.DEFINE_string("model", "169m", "A model of experiments.bench_decode.MODELS.")
  flags.DEFINE_string("dtype", "float32", "The server's --dtype.")
  flags.DEFINE_string("tokenizer", "neox", "The server's --tokenizer.")
  flags.DEFINE_integer("slots", 16, "The server's --slots.", lower_bound=1)
  flags.DEFINE_integer("prefill_chunk", 128, "The server's --prefill_chunk.", lower_bound=1)
  flags.DEFINE_integer("decode_steps", 4, "The server's --decode_steps.", lower_bound=1)
  flags.DEFINE_list("clients", ["1", "4", "16"], "Concurrent streaming clients, one run each.")
  flags.DEFINE_integer("requests_per_client", 4, "Requests each client sends in turn.",
                       lower_bound=1)
  flags.DEFINE_list("prompt_tokens", ["16", "128"], "Prompt length range (random ids).")
  flags.DEFINE_integer("max_tokens", 64, "New tokens per request.", lower_bound=1)
  flags.DEFINE_integer("prefix_tokens", 2000, "The shared prefix's length.", lower_bound=1)
  flags.DEFINE_integer("suffix_tokens", 16, "Tokens after the prefix.", lower_bound=1)
  flags.DEFINE_integer("prefix_trials", 3, "Requests per prefix case (the median is kept).",
                       lower_bound=1)
  flags.DEFINE_bool("soak", False, "Run the soak instead of the throughput and prefix runs.")
  flags.DEFINE_integer("soak_requests", 500, "Soak: requests in all.", lower_bound=10)
  flags.DEFINE_integer("soak_clients", 32, "Soak: concurrent clients.", lower_bound=1)
  flags.DEFINE_integer("soak_warmup", 100, "Soak: requests before the memory baseline.",
                       lower_bound=0)
  flags.DEFINE_integer("soak_max_prompt", 512, "Soak: longest random prompt.", lower_bound=1)
  flags.DEFINE_float("soak_cache_mb", 32, "Soak: the server's --cache_mb (filled during the "
                     "warm-up, so that memory growth after it would be a leak).", lower_bound=0)
  flags.DEFINE_string("weights_dir", None, "Where the random .pth files are kept.")
  flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                      "Directory for the JSON and PNG.")
  flags.DEFINE_string("tag", None, "File name suffix; default the device (cpu, gpu_h200, ...).")


# ----------------------------------------------------------------------------------------------
# The server and the clients.

@dataclasses.dataclass
class Server:
  url: str
  proc: subprocess.Popen
  log: pathlib.Path

  def metrics(self) -> dict[str, float]:
    return metrics(self.url)

  def rss_bytes(self) -> int:
    for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
    return 0


def metrics(url: str) -> dict[str, float]:
  """Every sample of a server's /metrics by name (with labels: 'name{a="b"}')."""
  import httpx  # pylint: disable=g-import-not-at-top
  from prometheus_client import parser  # pylint: disable=g-import-not-at-top

  out = {}
  for family in parser.text_string_to_metric_families(httpx.get(f"{url}/metrics",
                                                                 timeout=30).text):
    for s in family.samples:
      labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
      out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
  return out


def idle(m: dict[str, float]) -> bool:
  """No slot busy and nothing queued, by a server's metrics."""
  return m["rwkv_active_slots"] == m["rwkv_reserved_slots"] == m["rwkv_queue_length"] == 0


@contextlib.contextmanager
def server(checkpoint: str | os.PathLike, *serve_flags: str, log: pathlib.Path,
           env: dict[str, str] | None = None, start_timeout_s: float = 900) -> Iterator[Server]:
  """`python -m experiments.serve --checkpoint=... *serve_flags` on a free loopback port, once
  /health answers; stopped (SIGTERM, then SIGKILL) on exit. Its output goes to `log`."""
  import httpx  # pylint: disable=g-import-not-at-top
  import portpicker  # pylint: disable=g-import-not-at-top

  port = portpicker.pick_unused_port()
  with open(log, "w") as out:
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.serve", f"--checkpoint={checkpoint}",
         "--host=127.0.0.1", f"--port={port}", *serve_flags], cwd=_REPO,
        env=env or dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
  srv = Server(f"http://127.0.0.1:{port}", proc, pathlib.Path(log))
  try:
    deadline = time.monotonic() + start_timeout_s
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
      if time.monotonic() > deadline:
        raise RuntimeError(f"the server did not start in {start_timeout_s} s:\n"
                           f"{log.read_text()[-3000:]}")
      with contextlib.suppress(httpx.HTTPError):
        if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
          break
      time.sleep(0.5)
    yield srv
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@dataclasses.dataclass(frozen=True)
class Result:
  """One request as its client saw it (times in seconds from sending it)."""

  status: int
  total_s: float
  ttft_s: float | None = None  # the first event with text
  tokens: int = 0  # completion tokens (usage)
  events: int = 0


def completion(http, url: str, body: dict[str, Any] | bytes, *, leave_after: int | None = None
               ) -> Result:
  """Sends one completion (streamed if body["stream"]) and times it; with leave_after, the
  client closes the connection after that many events."""
  start = time.perf_counter()
  if isinstance(body, bytes) or not body.get("stream"):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = http.post(f"{url}/v1/completions", headers={"Content-Type": "application/json"},
                         **kwargs)
    tokens = 0
    if response.status_code == 200:
      tokens = response.json()["usage"]["completion_tokens"]
    return Result(response.status_code, time.perf_counter() - start, tokens=tokens)
  ttft, tokens, events = None, 0, 0
  with http.stream("POST", f"{url}/v1/completions", json=body) as response:
    if response.status_code != 200:
      response.read()
      return Result(response.status_code, time.perf_counter() - start)
    for line in response.iter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line[len("data: "):])
      if "error" in event:
        return Result(500, time.perf_counter() - start, ttft, tokens, events)
      events += 1
      if ttft is None and any(c.get("text") for c in event.get("choices", [])):
        ttft = time.perf_counter() - start
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
      if leave_after is not None and events >= leave_after:
        break
  return Result(200, time.perf_counter() - start, ttft, tokens, events)


def quantile(xs: Sequence[float], q: float) -> float | None:
  """The q-quantile by linear interpolation; None for no data."""
  xs = sorted(xs)
  if not xs:
    return None
  pos = q * (len(xs) - 1)
  lo = int(pos)
  hi = min(lo + 1, len(xs) - 1)
  return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
  return [rng.randrange(1, vocab) for _ in range(n)]  # 0 is end-of-text in the Pile vocabulary


# ----------------------------------------------------------------------------------------------
# Measurements.

def throughput(url: str, clients: int, requests_per_client: int, prompt_range: tuple[int, int],
               max_tokens: int, vocab: int, seed: int = 0) -> dict[str, Any]:
  """`clients` threads each streaming `requests_per_client` completions in turn."""
  import httpx  # pylint: disable=g-import-not-at-top

  def client(c: int) -> list[Result]:
    rng = random.Random(seed * 1000 + c)
    results = []
    with httpx.Client(timeout=600) as http:
      for _ in range(requests_per_client):
        body = {"model": MODEL_NAME, "prompt": _ids(rng, rng.randint(*prompt_range), vocab),
                "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        results.append(completion(http, url, body))
    return results

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [r for rs in pool.map(client, range(clients)) for r in rs]
  wall = time.perf_counter() - start
  ok = [r for r in results if r.status == 200 and r.ttft_s is not None]
  itl = [(r.total_s - r.ttft_s) / (r.tokens - 1) for r in ok if r.tokens > 1]
  tokens = sum(r.tokens for r in ok)
  return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
          "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
          "ttft_median_s": quantile([r.ttft_s for r in ok], 0.5),
          "ttft_p99_s": quantile([r.ttft_s for r in ok], 0.99),
          "itl_median_s": quantile(itl, 0.5), "itl_p99_s": quantile(itl, 0.99)}


def prefix_ttft(url: str, prefix_tokens: int, suffix_tokens: int, trials: int, vocab: int,
                seed: int = 0) -> dict[str, Any]:
  """Time to first token of prefix + suffix prompts: cold (every prefix new) and cached (the
  prefix sent once before, alone)."""
  import httpx  # pylint: disable=g-import-not-at-top

  rng = random.Random(seed)
  body = lambda ids: {"model": MODEL_NAME, "prompt": ids, "max_tokens": 2, "temperature": 0,
                      "ignore_eos": True, "stream": True}
  with httpx.Client(timeout=600) as http:
    cold = [completion(http, url, body(_ids(rng, prefix_tokens + suffix_tokens, vocab)))
            for _ in range(trials)]
    shared = _ids(rng, prefix_tokens, vocab)
    completion(http, url, body(shared))
    cached = [completion(http, url, body(shared + _ids(rng, suffix_tokens, vocab)))
              for _ in range(trials)]
  cold_s, cached_s = [r.ttft_s for r in cold], [r.ttft_s for r in cached]
  return {"prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens,
          "ttft_cold_s": cold_s, "ttft_cached_s": cached_s,
          "ttft_cold_median_s": quantile(cold_s, 0.5),
          "ttft_cached_median_s": quantile(cached_s, 0.5),
          "speedup": quantile(cold_s, 0.5) / quantile(cached_s, 0.5)}


MALFORMED = (
    ("bad JSON", lambda: b'{"model": "' + MODEL_NAME.encode() + b'", "prompt": ', 400),
    ("unknown model", lambda: {"model": "nope", "prompt": "a"}, 400),
    ("temperature out of range", lambda: {"model": MODEL_NAME, "prompt": "a",
                                          "temperature": 9}, 400),
    ("prompt over the limit", lambda: {"model": MODEL_NAME, "prompt": [1] * 5000}, 400),
    ("body over the limit", lambda: {"model": MODEL_NAME, "prompt": "a" * (2 << 20)}, 413),
)


def soak(srv: Server, requests: int, clients: int, warmup: int, max_prompt: int, vocab: int,
         max_tokens: int = 64, seed: int = 0) -> dict[str, Any]:
  """The soak described in the module docstring; returns what it checked."""
  import httpx  # pylint: disable=g-import-not-at-top

  counter = iter(range(requests))
  lock = threading.Lock()
  done, rss = [0], []  # requests finished; (seconds, finished, VmRSS) samples
  baseline = {}
  start = time.perf_counter()

  def sample():
    rss.append((time.perf_counter() - start, done[0], srv.rss_bytes()))

  def one(i: int, http) -> tuple[str, int, int]:
    rng = random.Random(seed * 100003 + i)
    if i % 10 == 3:
      name, make, expected = MALFORMED[(i // 10) % len(MALFORMED)]
      return name, completion(http, srv.url, make()).status, expected
    body = {"model": MODEL_NAME, "prompt": _ids(rng, rng.randint(1, max_prompt), vocab),
            "max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
            "top_p": rng.choice([1.0, 0.9]), "stream": rng.random() < 0.5 or i % 10 == 7}
    if i % 10 == 7:
      return "cancelled", completion(http, srv.url, body, leave_after=2).status, 200
    return "streamed" if body["stream"] else "whole", completion(http, srv.url, body).status, 200

  def client(_) -> list[tuple[str, int, int]]:
    out = []
    with httpx.Client(timeout=600) as http:
      while True:
        with lock:
          i = next(counter, None)
        if i is None:
          return out
        out.append(one(i, http))
        with lock:
          done[0] += 1
          if done[0] == warmup:
            sample()
            baseline["rss"] = rss[-1][2]
          elif done[0] % 25 == 0:
            sample()

  sample()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    outcomes = [o for os_ in pool.map(client, range(clients)) for o in os_]
  wall = time.perf_counter() - start
  deadline = time.monotonic() + 120
  while True:
    m = srv.metrics()
    if idle(m) or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  sample()
  statuses: dict[str, dict[str, int]] = {}
  for kind, status, _ in outcomes:
    statuses.setdefault(kind, {}).setdefault(str(status), 0)
    statuses[kind][str(status)] += 1
  unexpected = [(kind, status, want) for kind, status, want in outcomes if status != want]
  server_errors = sum(v for k, v in m.items() if 'status="5' in k)
  growth = rss[-1][2] / baseline["rss"] - 1 if baseline.get("rss") else None
  return {
      "requests": requests, "clients": clients, "warmup": warmup, "wall_s": wall,
      "statuses": statuses, "unexpected": unexpected[:20],
      "server_5xx": int(server_errors) + sum(1 for _, s, _ in outcomes if s >= 500),
      "idle_at_end": idle(m), "engine_errors": m["rwkv_engine_errors_total"],
      "cancelled": m["rwkv_requests_cancelled_total"],
      "generated_tokens": m["rwkv_generated_tokens_total"],
      "rss_after_warmup_bytes": baseline.get("rss"), "rss_end_bytes": rss[-1][2],
      "rss_growth": growth, "rss_samples": rss,
      "passed": bool(not unexpected and not server_errors and idle(m) and growth is not None
                     and growth < RSS_GROWTH_LIMIT),
  }


# ----------------------------------------------------------------------------------------------
# The record and its figure.

def targets(throughputs: Sequence[dict[str, Any]], prefix: dict[str, Any] | None
            ) -> list[dict[str, Any]]:
  values = {f"tokens_per_s@{t['clients']}": t["tokens_per_s"] for t in throughputs}
  if prefix:
    values.update(ttft_cold=prefix["ttft_cold_median_s"],
                  ttft_cached=prefix["ttft_cached_median_s"])
  out = []
  for name, measured, base, minimum in TARGETS:
    if measured in values and base in values and values[base]:
      ratio = values[measured] / values[base]
      out.append({"name": name, "ratio": ratio, "minimum": minimum, "met": ratio >= minimum})
    else:
      out.append({"name": name, "ratio": None, "minimum": minimum, "met": None})
  return out


def plot(record: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from experiments import plots  # pylint: disable=g-import-not-at-top

  if "soak" in record:
    s = record["soak"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x[1] for x in s["rss_samples"]], [x[2] / 2**20 for x in s["rss_samples"]], "o-")
    ax.axvline(s["warmup"], color="gray", ls=":", label="end of warm-up")
    ax.set_xlabel("requests finished")
    ax.set_ylabel("server VmRSS (MiB)")
    ax.set_title(f"soak: {s['requests']} requests, {s['clients']} clients; growth "
                 f"{100 * (s['rss_growth'] or 0):.1f}%")
    ax.legend()
    return plots.save_figure(fig, path)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  t = record["throughput"]
  clients = [x["clients"] for x in t]
  axes[0].plot(clients, [x["tokens_per_s"] for x in t], "o-")
  axes[0].set_xlabel("concurrent streaming clients")
  axes[0].set_ylabel("aggregate tokens/s")
  axes[0].set_xscale("log", base=2)
  for key, label in (("ttft_median_s", "TTFT median"), ("ttft_p99_s", "TTFT p99"),
                     ("itl_median_s", "ITL median"), ("itl_p99_s", "ITL p99")):
    axes[1].plot(clients, [1e3 * (x[key] or 0) for x in t], "o-", label=label)
  axes[1].set_xlabel("concurrent streaming clients")
  axes[1].set_ylabel("ms")
  axes[1].set_xscale("log", base=2)
  axes[1].set_yscale("log")
  axes[1].legend(fontsize=8)
  p = record.get("prefix")
  if p:
    axes[2].bar(["cold", "cached"], [p["ttft_cold_median_s"], p["ttft_cached_median_s"]])
    axes[2].set_ylabel("time to first token (s)")
    axes[2].set_title(f"{p['prefix_tokens']}-token prefix: {p['speedup']:.1f}x")
  fig.suptitle(f"{record['config']['model']} {record['config']['dtype']}, "
               f"{record['config']['slots']} slots, {record['environment']['device_kind']}")
  return plots.save_figure(fig, path)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise _cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
  # This process only writes the random weights and reads the device's name: it must not take
  # the accelerator's memory from the server.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from experiments import bench_decode  # pylint: disable=g-import-not-at-top

  if f.model not in bench_decode.MODELS:
    raise _cli.UsageError(f"--model={f.model}: choose from {sorted(bench_decode.MODELS)}.")
  clients = _cli.integers("clients", f.clients, minimum=1)
  prompt_range = _cli.integers("prompt_tokens", f.prompt_tokens, minimum=1)
  if len(prompt_range) != 2 or prompt_range[0] > prompt_range[1]:
    raise _cli.UsageError("--prompt_tokens takes MIN,MAX, e.g. --prompt_tokens=16,128.")
  out = _cli.output_path("out", f.out, directory=True)
  from experiments import benchlib  # pylint: disable=g-import-not-at-top

  checkpoint = bench_decode.weights_path(f.model, f.weights_dir)
  vocab = min(bench_decode.PILE_VOCAB, 50000)
  tag = f.tag or benchlib.default_tag()
  out.mkdir(parents=True, exist_ok=True)
  name = f"bench_serve_soak_{tag}" if f.soak else f"bench_serve_{tag}"
  serve_flags = [f"--dtype={f.dtype}", f"--tokenizer={f.tokenizer}", f"--slots={f.slots}",
                 f"--prefill_chunk={f.prefill_chunk}", f"--decode_steps={f.decode_steps}",
                 f"--model_name={MODEL_NAME}", "--max_prompt_tokens=4096",
                 "--max_new_tokens=1024", f"--max_queue={max(256, f.soak_clients)}"]
  if f.soak:
    serve_flags.append(f"--cache_mb={f.soak_cache_mb}")
  config = {"model": f.model, "dtype": f.dtype, "slots": f.slots,
            "prefill_chunk": f.prefill_chunk, "decode_steps": f.decode_steps,
            "serve_flags": serve_flags}
  record: dict[str, Any] = {"benchmark": "bench_serve", "config": config}
  log = pathlib.Path(tempfile.gettempdir()) / f"{name}_server.log"  # for a failed start
  with server(checkpoint, *serve_flags, log=log) as srv:
    record["environment"] = benchlib.environment()
    if f.soak:
      config.update(soak_requests=f.soak_requests, soak_clients=f.soak_clients,
                    soak_warmup=f.soak_warmup, soak_max_prompt=f.soak_max_prompt)
      record["soak"] = soak(srv, f.soak_requests, f.soak_clients, f.soak_warmup,
                            f.soak_max_prompt, vocab)
      print(json.dumps({k: v for k, v in record["soak"].items() if k != "rss_samples"}))
    else:
      config.update(requests_per_client=f.requests_per_client, prompt_tokens=prompt_range,
                    max_tokens=f.max_tokens)
      record["throughput"] = []
      for c in clients:
        record["throughput"].append(throughput(srv.url, c, f.requests_per_client,
                                               tuple(prompt_range), f.max_tokens, vocab))
        print(json.dumps(record["throughput"][-1]))
        benchlib.write_json(out / f"{name}.json", record)
      record["prefix"] = prefix_ttft(srv.url, f.prefix_tokens, f.suffix_tokens,
                                     f.prefix_trials, vocab)
      print(json.dumps(record["prefix"]))
      record["targets"] = targets(record["throughput"], record["prefix"])
      print(json.dumps(record["targets"]))
    record["server_metrics_at_end"] = {k: v for k, v in srv.metrics().items()
                                       if not k.endswith("_created")}
  benchlib.write_json(out / f"{name}.json", record)
  plot(record, out / f"{name}.png")


if __name__ == "__main__":
  define_flags()
  _cli.run(main)
