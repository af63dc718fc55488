"""The notebooks: valid nbformat 4.5 with outputs cleared, and each one runs top to bottom.

Each notebook has a cell tagged "parameters" (papermill's convention); the tests insert a cell
after it with small sizes and run the notebook from the checkout in a real Jupyter kernel, as a
user would (nothing is installed: the notebook finds the checkout and uses it).
"""

import json
import pathlib
import re

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "train_tpu.ipynb", "benchmark.ipynb"}


def source(cell):
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def execute(name: str, overrides: str, timeout: int = 600):
  """Runs notebooks/NAME with `overrides` after its parameters cell; returns it with outputs."""
  nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(overrides))
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO / "notebooks")}})
  client.execute()
  return nb


def text_output(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o["text"])
      elif "data" in o and "text/plain" in o["data"]:
        out.append(o["data"]["text/plain"])
  return "".join(out)


def has_image(nb) -> bool:
  return any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_the_expected_notebooks_exist():
  assert EXPECTED == {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat_with_outputs_cleared_and_a_parameters_cell(path):
  nb = json.loads(path.read_text(encoding="utf-8"))
  nbformat.validate(nbformat.reads(path.read_text(encoding="utf-8"), as_version=4))
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
  assert len(tagged) == 1, "one cell tagged 'parameters'"
  assert "REPO_URL" in source(tagged[0])
  for cell in nb["cells"]:
    assert source(cell).strip(), "empty cell"
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, source(cell)[:60]


@pytest.mark.slow
def test_quickstart_runs_offline_with_random_weights_and_a_state_that_does_not_grow():
  nb = execute("quickstart.ipynb", "OFFLINE = True\nRANDOM_SHAPE = dict(n_layer=2, n_embd=64)\n"
               "MAX_TOKENS = 8\nFT_STEPS = 20")
  out = text_output(nb)
  assert "NOTE: random weights" in out
  diff = float(re.search(r"whole vs two pieces: ([0-9.e+-]+)", out).group(1))
  assert diff < 1e-4
  sizes = re.search(r"after 10 tokens: ([\d,]+) bytes; after \d+ tokens: ([\d,]+) bytes", out)
  assert sizes.group(1) == sizes.group(2)
  # Fine-tuning: LoRA and state tuning each lower the held-out loss of the responses.
  held_out = dict(re.findall(r"(\w[\w ]*): held-out loss ([0-9.]+) nats per response token", out))
  assert sorted(held_out) == ["LoRA", "base", "state tuning"]
  assert float(held_out["LoRA"]) < float(held_out["base"])
  assert float(held_out["state tuning"]) < float(held_out["base"])
  assert re.search(r"state: \[.*'learned.state'", out)


@pytest.mark.slow
def test_train_notebook_trains_resumes_plots_and_samples(tmp_path):
  overrides = f"""WORKDIR = {str(tmp_path / 'run')!r}
STEPS = 8
OVERRIDES = ["--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.ctx_len=32",
             "--config.train.batch_size=8", "--config.train.log_every=2",
             "--config.train.eval_every=4", "--config.train.eval_batches=1",
             "--config.train.checkpoint_every=4", "--config.optim.warmup_steps=2"]"""
  nb = execute("train_tpu.ipynb", overrides)
  out = text_output(nb)
  assert re.search(r"[Rr]esum\w* .*step 4", out), "the second run resumes from step 4"
  assert (tmp_path / "run" / "export").is_dir()
  assert has_image(nb), "the loss plot is shown inline"
  assert "Anarchism is" in out


@pytest.mark.slow
def test_benchmark_notebook_measures_and_plots(tmp_path):
  nb = execute("benchmark.ipynb", f'SHAPES = "2x33x20"\nDTYPES = "float32"\nBUDGET_S = 120\n'
               f'OUT = {str(tmp_path)!r}')
  record = json.loads(next(tmp_path.glob("bench_wkv_*.json")).read_text())
  assert {e["impl"] for e in record["entries"] if e["status"] == "ok"} == {"scan", "associative"}
  assert has_image(nb)
