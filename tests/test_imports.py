"""The import graph of the repository's packages: no cycle, and dependencies that point one way.

    experiments -> rwkv_jax <- rwkv_jax_kernels (kernels/)

The library reaches a kernel only by its module's name, loaded lazily (`wkv`'s backends,
`quant.CPU_KERNEL_BACKEND`); the kernels use only the library's public names. Imports inside
functions count: they are cycles that wait for the first call.
"""

import ast
import pathlib
import shutil

REPO = pathlib.Path(__file__).resolve().parent.parent
# Package name -> its folder: every package the repository installs or runs.
PACKAGES = {"rwkv_jax": REPO / "rwkv_jax", "rwkv_jax_kernels": REPO / "kernels",
            "experiments": REPO / "experiments"}


def modules(packages: dict[str, pathlib.Path]) -> dict[str, ast.Module]:
  """Dotted module name (a package is its __init__) -> parsed source, for every .py file."""
  found = {}
  for package, root in packages.items():
    for path in sorted(root.rglob("*.py")):
      parts = (package, *path.relative_to(root).with_suffix("").parts)
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = ast.parse(path.read_text(), filename=str(path))
  return found


def _is_package(name: str, known: set[str]) -> bool:
  return any(m.startswith(name + ".") for m in known)


def imported_modules(tree: ast.Module, name: str, known: set[str]) -> set[str]:
  """The modules of `known` that module `name` imports anywhere in its body.

  Handles `import a.b`, `from a import b` (b a module or a name in a), `from a.b import c` and
  relative forms (`from . import x`, `from ..y import z`).
  """
  package = name if _is_package(name, known) else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      targets = [".".join(filter(None, [module, alias.name])) for alias in node.names] + [module]
    else:
      continue
    for target in targets:
      # The longest known prefix: `rwkv_jax.io.weights.load` is the module rwkv_jax.io.weights.
      parts = target.split(".")
      for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
          found.add(".".join(parts[:n]))
          break
  # `from rwkv_jax.io import weights` also names the package rwkv_jax.io: keep only what is real.
  return found - {name}


def import_graph(packages: dict[str, pathlib.Path] = PACKAGES) -> dict[str, set[str]]:
  trees = modules(packages)
  known = set(trees)
  graph = {}
  for name, tree in trees.items():
    targets = imported_modules(tree, name, known)
    # Importing a.b.c runs a/__init__ and a/b/__init__ too; those are empty here, so only the
    # module itself is an edge, except where a package's __init__ holds code.
    graph[name] = {t for t in targets if not _is_package(t, known) or trees[t].body}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (depth-first search, nodes visited in name order)."""
  done, on_path = set(), []

  def visit(node):
    if node in on_path:
      return on_path[on_path.index(node):] + [node]
    if node in done:
      return None
    on_path.append(node)
    for nxt in sorted(graph[node]):
      if (cycle := visit(nxt)) is not None:
        return cycle
    on_path.pop()
    done.add(node)
    return None

  for start in sorted(graph):
    if (cycle := visit(start)) is not None:
      return cycle
  return None


def test_every_import_form_is_seen():
  known = {"p", "p.a", "p.b", "p.c", "p.d", "p.d.e", "p.f", "p.g", "p.h", "p.x", "q"}
  tree = ast.parse("import p.a\nfrom p import b as bb, c\nfrom p.d import e\n"
                   "def f():\n  from p import g\nimport numpy\n"
                   "from . import h\nfrom .f import y\nfrom .. import q\n")
  assert imported_modules(tree, "p.x", known) == {"p", "p.a", "p.b", "p.c", "p.d", "p.d.e",
                                                   "p.g", "p.h", "p.f", "q"}


def test_find_cycle_reports_the_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_a_real_cycle_through_a_function_level_import_is_found(tmp_path):
  # The library itself with one import added inside a function of model.py: the train loop
  # imports the model, so this closes a cycle across two subpackages.
  copy = tmp_path / "rwkv_jax"
  shutil.copytree(PACKAGES["rwkv_jax"], copy, ignore=shutil.ignore_patterns("__pycache__"))
  with open(copy / "model.py", "a", encoding="utf-8") as f:
    f.write("\n\ndef _late():\n  from rwkv_jax.train import loop\n  return loop\n")
  graph = import_graph({"rwkv_jax": copy})
  cycle = find_cycle(graph)
  assert cycle is not None and "rwkv_jax.model" in cycle and "rwkv_jax.train.loop" in cycle
  assert find_cycle(import_graph({"rwkv_jax": PACKAGES["rwkv_jax"]})) is None


def test_no_package_has_an_import_cycle():
  graph = import_graph()
  assert {"rwkv_jax.io.weights", "rwkv_jax.train.loop", "rwkv_jax_kernels.wkv_pallas",
          "experiments.train"} <= graph.keys()  # the walk found every package
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_library_imports_neither_the_kernels_nor_the_runners():
  graph = import_graph()
  wrong = {(m, t) for m, targets in graph.items() if m.startswith("rwkv_jax.") or m == "rwkv_jax"
           for t in targets if t.split(".")[0] in ("rwkv_jax_kernels", "experiments")}
  assert not wrong, f"the library must reach kernels only by name: {sorted(wrong)}"


def test_the_kernels_named_by_the_library_exist():
  from rwkv_jax import quant, wkv  # pylint: disable=g-import-not-at-top

  names = {quant.CPU_KERNEL_BACKEND, *wkv._PLUGINS.values()}  # pylint: disable=protected-access
  names.update(*wkv._MORE_PLUGINS.values())  # pylint: disable=protected-access
  assert names <= set(modules(PACKAGES)), sorted(names - set(modules(PACKAGES)))


def _private_uses(tree: ast.Module, library: str = "rwkv_jax") -> list[str]:
  """`_names` of the library that a module uses: imported, or read off an imported module."""
  bound, uses = set(), []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == library:
      for alias in node.names:
        if alias.name.startswith("_"):
          uses.append(f"{node.module}.{alias.name}")
        bound.add(alias.asname or alias.name)
    elif isinstance(node, ast.Import):
      bound.update(a.asname or a.name.split(".")[0] for a in node.names
                   if a.name.split(".")[0] == library)
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
        and node.value.id in bound):
      uses.append(f"{node.value.id}.{node.attr}")
  return uses


def test_private_names_are_found():
  tree = ast.parse("from rwkv_jax import wkv as w\nfrom rwkv_jax.wkv import _x\nw._y\nw.z\n")
  assert sorted(_private_uses(tree)) == ["rwkv_jax.wkv._x", "w._y"]


def test_the_kernels_use_only_public_names_of_the_library():
  trees = modules({"rwkv_jax_kernels": PACKAGES["rwkv_jax_kernels"]})
  uses = {name: _private_uses(tree) for name, tree in trees.items()}
  assert not any(uses.values()), {k: v for k, v in uses.items() if v}
