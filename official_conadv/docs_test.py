"""The README and docs/ cannot go stale silently.

* Every ```python block in docs/ runs (a fresh interpreter per block, from a
  temporary directory, the repo on PYTHONPATH); snippets that are not meant
  to run are ```text. The README's ```python blocks are the "Using it"
  examples, which readme_test.py runs.
* Everything they name is checked against the code: flags of
  `official_conadv.train` / `official_conadv.rehearse` / `benchmarks.*`
  command lines, config fields (`section.field`), experiment names, make
  targets, repo file paths and the links between pages.
"""

import dataclasses
import glob
import itertools
import os
import re
import subprocess
import sys

import pytest

from official_conadv import configs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(_ROOT, "docs", "*.md")))
DOCS = [os.path.join(_ROOT, "README.md")] + PAGES
SECTIONS = ("model", "adversary", "optimizer", "data", "train", "runtime")
# Pages the README's first screen promises (docs/design.md section 4).
REQUIRED_PAGES = ("design", "map", "tpu", "gpu", "cli", "own_model",
                  "schedules", "benchmarks", "rehearsal", "known_issues")


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _rel(path):
  return os.path.relpath(path, _ROOT)


def _blocks(text, language):
  return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def _without_code_blocks(text):
  return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def test_every_promised_page_exists():
  have = {os.path.splitext(os.path.basename(p))[0] for p in PAGES}
  assert set(REQUIRED_PAGES) <= have, set(REQUIRED_PAGES) - have


def test_readme_python_blocks_are_the_using_it_examples():
  from official_conadv import readme_test  # pylint: disable=g-import-not-at-top
  text = _read(os.path.join(_ROOT, "README.md"))
  assert _blocks(text, "python") == readme_test.using_it_examples(text)


def test_the_first_screen_is_a_screen():
  text = _read(os.path.join(_ROOT, "README.md"))
  first = text.split("\n## Using it\n", 1)[0]
  assert len(first.splitlines()) <= 90, len(first.splitlines())
  for page in REQUIRED_PAGES:
    assert f"(docs/{page}.md)" in first, page
  assert "never" in first.lower() or "nothing has run" in first.lower()


_DOC_BLOCKS = [(p, i, code) for p in PAGES
               for i, code in enumerate(_blocks(_read(p), "python"))]


@pytest.mark.parametrize("page,index,code", _DOC_BLOCKS,
                         ids=[f"{_rel(p)}[{i}]" for p, i, _ in _DOC_BLOCKS])
def test_docs_python_blocks_run(page, index, code, tmp_path):
  del index
  script = tmp_path / "block.py"
  script.write_text(code)
  env = dict(os.environ, PYTHONPATH=_ROOT, CUDA_VISIBLE_DEVICES="",
             TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, f"{_rel(page)}:\n{done.stderr[-3000:]}"


# ------------------------------------------------------------------ names
def _defined_flags(path):
  """Flag names a module defines (absl DEFINE_* calls, and the key flags of
  sibling modules it adopts), read from source."""
  text = _read(path)
  names = set(re.findall(r"DEFINE_[a-z_]+\(\s*\"([a-z0-9_]+)\"", text))
  # argparse scripts (benchmarks/backend_step_time.py runs without absl).
  names |= set(re.findall(r"add_argument\(\s*\"--([a-z0-9_]+)\"", text))
  adopted = set(re.findall(r"adopt_module_key_flags\((\w+)\)", text))
  # Sibling modules imported at the top define their flags on import.
  adopted |= set(re.findall(r"^from benchmarks import (\w+)", text,
                            re.MULTILINE))
  for module in sorted(adopted):
    names |= _defined_flags(os.path.join(os.path.dirname(path),
                                         module + ".py"))
  return names


def _flag_sets():
  sets = {"official_conadv.train":
              _defined_flags(os.path.join(_ROOT, "official_conadv",
                                          "train.py")),
          "official_conadv.rehearse":
              _defined_flags(os.path.join(_ROOT, "official_conadv",
                                          "rehearse.py"))}
  for path in glob.glob(os.path.join(_ROOT, "benchmarks", "*.py")):
    name = os.path.splitext(os.path.basename(path))[0]
    sets[f"benchmarks.{name}"] = _defined_flags(path)
  # absl's own flags, valid on every absl main.
  common = {"helpfull", "help", "helpshort", "verbosity", "v",
            "logtostderr", "alsologtostderr", "flagfile"}
  return {k: v | common for k, v in sets.items()}


def _commands(text):
  """(module, the command's text) of every `python -m <module>` command in
  code blocks and inline code, with its continuation lines."""
  found = []
  lines = text.splitlines()
  for i, line in enumerate(lines):
    for m in re.finditer(r"python -m ([a-z_.]+)", line):
      command = line[m.start():]
      j = i
      while command.rstrip().endswith("\\") and j + 1 < len(lines):
        j += 1
        command = command.rstrip()[:-1] + " " + lines[j]
      command = command.split("`", 1)[0]
      found.append((m.group(1), command))
  return found


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_flags_on_command_lines_exist(path):
  flag_sets = _flag_sets()
  problems = []
  for module, command in _commands(_read(path)):
    if module not in flag_sets:
      if module.startswith(("official_conadv", "benchmarks")):
        problems.append(f"no module {module}")
      continue  # pip, pytest, venv, tensorboard: not ours.
    for flag in re.findall(r"(?<![\w-])--([a-z][a-z0-9_]*)", command):
      if flag.startswith("no") and flag[2:] in flag_sets[module]:
        continue  # absl's --noflag.
      if flag not in flag_sets[module]:
        problems.append(f"{module} has no --{flag}")
  assert not problems, problems


def _config_fields():
  fields = {}
  for section in SECTIONS:
    cls = type(getattr(configs.ExperimentConfig(), section))
    fields[section] = {f.name for f in dataclasses.fields(cls)}
  return fields


def _is_keras_attribute(name):
  """`model.fit`, `optimizer.apply_gradients`: Keras objects, not fields."""
  import keras  # pylint: disable=g-import-not-at-top
  return any(hasattr(cls, name) for cls in (keras.Model,
                                            keras.optimizers.Optimizer))


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_config_fields_exist(path):
  """`section.field` in an override (`section.field=value`) or as a whole
  inline-code token; Keras methods (`model.fit`) and files (`train.py`)
  are not fields."""
  fields = _config_fields()
  text = _read(path)
  sections = "|".join(SECTIONS)
  named = set(re.findall(
      rf"(?<![\w./-])({sections})\.([a-z_][a-z0-9_]*)=", text))
  for section, field in re.findall(rf"`({sections})\.([a-z_][a-z0-9_]*)`",
                                   text):
    if field not in ("py", "json", "md") and not _is_keras_attribute(field):
      named.add((section, field))
  problems = [f"{s}.{f}" for s, f in sorted(named) if f not in fields[s]]
  assert not problems, problems


def _expand(pattern):
  """`a_{x,y}_{1k,4k}` -> every name it stands for."""
  parts = re.split(r"\{([^}]*)\}", pattern)
  choices = [[p] if i % 2 == 0 else p.split(",") for i, p in
             enumerate(parts)]
  return ["".join(c) for c in itertools.product(*choices)]


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_experiment_names_exist(path):
  from official_conadv.data import registry  # pylint: disable=g-import-not-at-top
  names = set(configs.named_experiments().names())
  text = _read(path)
  candidates = set(re.findall(r"--experiment=([a-z0-9_{},]+)", text))
  candidates |= set(re.findall(
      r"`((?:imagenet|mnist|cifar10)_[a-z0-9_{},]+)`", text))
  problems = []
  for candidate in sorted(candidates):
    if (candidate in ("list",) or candidate.endswith("_") or
        candidate in registry.DATASETS):  # data.name values.
      continue
    for name in _expand(candidate):
      name = name.split("+", 1)[0]
      if name not in names:
        problems.append(name)
  assert not problems, problems


def _make_targets():
  text = _read(os.path.join(_ROOT, "Makefile"))
  return set(re.findall(r"^([a-z][a-z-]*):", text, re.MULTILINE))


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_make_targets_exist(path):
  targets = _make_targets()
  # `make X` in inline code, or a command line in a code block.
  named = set(re.findall(r"(?:`|^\s*)make ([a-z][a-z-]*)\b", _read(path),
                         re.MULTILINE))
  assert named <= targets, named - targets


_PATH = re.compile(
    r"`((?:official_conadv|experiments|benchmarks|testdata|docs|tools)/"
    r"[A-Za-z0-9_./*-]*|[A-Za-z0-9_.-]+\.(?:toml|txt|cff|ipynb))`")


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_file_paths_exist(path):
  problems = []
  for name in sorted(set(_PATH.findall(_read(path)))):
    name = name.rstrip("/.")
    if "*" in name or "<" in name:
      if not glob.glob(os.path.join(_ROOT, name)):
        problems.append(name)
    elif not os.path.exists(os.path.join(_ROOT, name)):
      problems.append(name)
  assert not problems, problems


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_links_between_pages_resolve(path):
  text = _without_code_blocks(_read(path))
  problems = []
  for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
    if re.match(r"[a-z]+://", target):
      continue
    if not os.path.exists(os.path.join(os.path.dirname(path), target)):
      problems.append(target)
  assert not problems, problems


def test_no_page_points_outside_the_repo():
  for path in DOCS:
    text = _read(path)
    assert "../shared" not in text and "DESIGN.md" not in text, _rel(path)
