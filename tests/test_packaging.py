"""`pip install .` installs the library and nothing else; the runners run from a checkout.

The wheel is built as pip builds it for a user (not editable, offline), installed into a folder of
its own, and imported in a fresh process whose working directory holds nothing but a copy of
experiments/: the library, each subpackage and the kernels' C++ source must come from the
installed folder, and every runner the README names must import against it.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every package of the library: each folder of rwkv_jax/ with an __init__.py.
LIBRARY = sorted(".".join(p.parent.relative_to(REPO).parts)
                 for p in (REPO / "rwkv_jax").rglob("__init__.py"))
RUNNERS = sorted(set(re.findall(r"python -m experiments\.(\w+)", (REPO / "README.md").read_text())))


def _pip(*args: str) -> None:
  result = subprocess.run([sys.executable, "-m", "pip", *args, "--no-index", "-q"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  # Built from a copy of what the build reads, so that it leaves no build/ or *.egg-info behind.
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(REPO / name, src / name)
  for name in ("rwkv_jax", "kernels"):
    shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
  dist = tmp_path_factory.mktemp("dist")
  _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src))
  (path,) = dist.glob("*.whl")
  return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> pathlib.Path:
  site = tmp_path_factory.mktemp("site")
  _pip("install", "--no-deps", "--target", str(site), str(wheel))
  return site


def test_the_wheel_holds_the_library_and_its_kernels_and_no_runners(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
  assert top == {"rwkv_jax", "rwkv_jax_kernels"}
  packages = {".".join(n.split("/")[:-1]) for n in names if n.endswith("/__init__.py")}
  assert set(LIBRARY) | {"rwkv_jax_kernels"} == packages  # pyproject.toml lists every one
  assert "rwkv_jax_kernels/int8_matmul_cpu.cc" in names


@pytest.mark.slow
def test_the_installed_library_serves_the_runners_of_a_checkout(site, tmp_path):
  shutil.copytree(REPO / "experiments", tmp_path / "experiments",
                  ignore=shutil.ignore_patterns("__pycache__", "results"))
  script = textwrap.dedent("""
      import importlib, json, sys
      from absl import flags

      found = {}
      for name in sys.argv[1].split(","):
        found[name] = importlib.import_module(name).__file__
      from rwkv_jax_kernels import int8_cpu
      found["int8_cpu.SOURCE"] = str(int8_cpu.SOURCE) if int8_cpu.SOURCE.is_file() else None
      for name in sys.argv[2].split(","):
        # Each runner defines its flags on import, some of the same names: drop them after each.
        before = set(flags.FLAGS)
        found[name] = importlib.import_module(name).__file__
        for flag in set(flags.FLAGS) - before:
          delattr(flags.FLAGS, flag)
      print(json.dumps(found))
  """)
  runners = [f"experiments.{name}" for name in RUNNERS]
  result = subprocess.run(
      [sys.executable, "-c", script, ",".join([*LIBRARY, "rwkv_jax_kernels"]), ",".join(runners)],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  found = {k: v and pathlib.Path(v) for k, v in json.loads(result.stdout.splitlines()[-1]).items()}
  for name in [*LIBRARY, "rwkv_jax_kernels", "int8_cpu.SOURCE"]:
    assert found[name] is not None and found[name].is_relative_to(site), (name, found[name])
  assert "train" in RUNNERS and "score" in RUNNERS  # the README was read
  for name in runners:
    assert found[name].is_relative_to(tmp_path / "experiments"), (name, found[name])
