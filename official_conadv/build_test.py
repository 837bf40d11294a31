"""Checks that BUILD describes the tree: Starlark parsed as Python."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_targets  # pylint: disable=g-import-not-at-top,wrong-import-position


def _targets():
  """{name: (rule, srcs, deps)} from BUILD, by evaluating its calls."""
  tree = ast.parse(open(os.path.join(ROOT, "BUILD")).read(), "BUILD")
  targets = {}
  for stmt in tree.body:
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
      continue
    call = stmt.value
    rule = call.func.id
    kw = {k.arg: k.value for k in call.keywords}
    if rule not in ("py_library", "py_test", "py_binary"):
      continue
    name = ast.literal_eval(kw["name"])
    srcs = ast.literal_eval(kw["srcs"])
    deps = [d.value for d in kw["deps"].elts if isinstance(d, ast.Constant)]
    reqs = [d.args[0].value for d in kw["deps"].elts
            if isinstance(d, ast.Call)]
    targets[name] = (rule, srcs, deps, reqs)
  return targets


def test_every_module_and_test_has_a_target():
  targets = _targets()
  srcs = {s: (name, rule) for name, (rule, ss, _, _) in targets.items()
          for s in ss if rule != "py_binary"}
  for path in build_targets.python_files():
    if os.path.basename(path) == "conftest.py":
      continue
    assert path in srcs, f"{path} has no BUILD target"
    want = "py_test" if path.endswith("_test.py") else "py_library"
    assert srcs[path][1] == want, f"{path} should be a {want}"
  assert targets["train"][0] == "py_binary"


def test_every_dep_exists_and_imports_are_deps():
  targets = _targets()
  known = {build_targets.module_name(p): p
           for p in build_targets.python_files()}
  for name, (_, srcs, deps, reqs) in targets.items():
    for dep in deps:
      assert dep.startswith(":") and dep[1:] in targets, (
          f"{name} depends on missing target {dep}")
    for src in srcs:
      repo, third = build_targets.imports(src, known)
      for p in repo:
        if not p.endswith("_test.py"):
          assert f":{build_targets.target_name(p)}" in deps or (
              targets[name][0] == "py_binary"), f"{name} lacks dep on {p}"
      if targets[name][0] != "py_binary":
        assert set(third) <= set(reqs), f"{name} lacks {set(third) - set(reqs)}"
        reqs_file = open(os.path.join(ROOT, "requirements.txt")).read().lower()
        for r in reqs:
          assert r.lower().replace("-", "_") in reqs_file.replace("-", "_"), (
              f"{name}: {r} is not pinned in requirements.txt")


def test_build_is_up_to_date():
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools",
                                                        "build_targets.py"),
                           "--check"], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
