"""The Colab notebooks: valid nbformat 4 JSON, outputs cleared, commands that exist in the repo."""

import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"colab_generate.ipynb", "colab_train_tpu.ipynb"}

# `python -m experiments.NAME --flag=...` up to the end of the (possibly continued) command.
_COMMAND = re.compile(r"python -m experiments\.(\w+)((?:\\\n|[^\n])*)")
_FLAG = re.compile(r"--([A-Za-z_]\w*)(?==|\s|$)")
_REPO_PATH = re.compile(r"(?<![\w/])((?:experiments|rwkv_jax)/[\w/]+\.py)")


def load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def source(cell):
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def code(nb):
  return "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "code")


def test_the_expected_notebooks_exist():
  assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat_4_with_outputs_cleared(path):
  nb = load(path)
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  assert nb["cells"], "empty notebook"
  ids = [c.get("id") for c in nb["cells"]]
  if nb["nbformat_minor"] >= 5:
    assert all(ids) and len(set(ids)) == len(ids), "nbformat 4.5 needs unique cell ids"
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code"), cell["cell_type"]
    assert isinstance(cell["metadata"], dict)
    assert source(cell).strip(), "empty cell"
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [], f"outputs not cleared in {source(cell)[:60]!r}"
      assert cell["execution_count"] is None
    else:
      assert "outputs" not in cell and "execution_count" not in cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_experiment_command_and_flag_exists(path):
  commands = _COMMAND.findall(code(load(path)))
  assert commands, f"{path.name} runs no `python -m experiments.X` command"
  for module, args in commands:
    file = REPO / "experiments" / f"{module}.py"
    assert file.is_file(), f"{path.name} runs experiments.{module}, but {file} does not exist"
    text = file.read_text(encoding="utf-8")
    for flag in _FLAG.findall(args):
      # absl flags are defined as DEFINE_*("name", ...) or DEFINE_config_file("name").
      assert re.search(rf"DEFINE_\w+\(\s*\"{flag}\"", text), (
          f"{path.name} passes --{flag} to experiments.{module}, which does not define it")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_repository_file_it_names_exists(path):
  for rel in _REPO_PATH.findall(code(load(path))):
    assert (REPO / rel).is_file(), f"{path.name} names {rel}, which does not exist"


def test_the_train_notebook_trains_char_tiny_over_all_cores_and_uses_the_export():
  text = code(load(REPO / "notebooks" / "colab_train_tpu.ipynb"))
  assert "--config=experiments/configs/char_tiny.py" in text
  assert "--config.mesh.data=-1" in text
  assert "--checkpoint=/content/run/export" in text
