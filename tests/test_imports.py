"""The rwkv_jax modules import each other without a cycle (imports inside functions included)."""

import ast
import pathlib

PACKAGE = "rwkv_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, ast.Module]:
  return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(ROOT.glob("*.py"))
          if p.stem != "__init__"}


def imported_modules(tree: ast.Module, known: set[str]) -> set[str]:
  """The rwkv_jax modules a module imports anywhere in its body (functions included).

  Handles `import rwkv_jax.x`, `from rwkv_jax import x`, `from rwkv_jax.x import y` and their
  relative forms (`from . import x`, `from .x import y`).
  """
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == PACKAGE and len(parts) > 1:
          found.add(parts[1])
    elif isinstance(node, ast.ImportFrom) and node.level <= 1:
      # Modules of rwkv_jax are top level in the package, so `.` is rwkv_jax itself.
      module = node.module if node.level == 0 else ".".join(filter(None, [PACKAGE, node.module]))
      parts = (module or "").split(".")
      if parts[0] != PACKAGE:
        continue
      if len(parts) > 1:
        found.add(parts[1])
      else:
        found.update(a.name for a in node.names)
  return found & known


def import_graph() -> dict[str, set[str]]:
  trees = _modules()
  return {name: imported_modules(tree, set(trees)) - {name} for name, tree in trees.items()}


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
  tree = ast.parse("import rwkv_jax.a\nfrom rwkv_jax import b as bb, c\nfrom rwkv_jax.d import e\n"
                   "def f():\n  from rwkv_jax import g\nimport numpy\nfrom rwkv_jax import z\n"
                   "from . import h\nfrom .f import y\n")
  assert imported_modules(tree, set("abcdefgh")) == {"a", "b", "c", "d", "f", "g", "h"}


def test_find_cycle_reports_the_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_rwkv_jax_has_no_import_cycle():
  graph = import_graph()
  assert {"weights", "checkpoint", "model"} <= graph.keys()  # the walk found the package
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
