"""A larger offline text corpus: the docstrings and docs of the Python packages installed beside dpmega.

The stdlib corpus (:func:`dpmega.data.text.prepare_stdlib_corpus`) gives about 16k rows of 32 tokens; the
packages installed next to dpmega (numpy, scipy, jax, flax, optax, ...) carry several times more English prose
that no one here wrote and that needs no download. :func:`prepare_package_corpus` turns it into the same
train/eval text files the ``text`` source reads (:func:`dpmega.data.text.read_documents`), with:

* **reproducibility**: packages and files walked in sorted order, fixed filters, and a SHA-256 of the written
  files recorded in ``manifest.json`` (the same environment gives the same hash);
* **deduplication**: a paragraph is kept only the first time its normalized form (case, whitespace,
  punctuation and digits folded: exact and near-exact copies) is seen, across all packages, so no paragraph
  is in both parts;
* **a held-out split by package**: whole packages go to the eval part (chosen by a hash of their names until
  about ``eval_percent`` of the text is held out); no package is in both parts.

A document is one docstring (or one ``.md``/``.rst`` file of a package); each kept paragraph is one line and
documents are separated by blank lines, the format of BERT's ``create_pretraining_data.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import sys
import sysconfig
from typing import Iterable, Iterator, Sequence

from dpmega.data.text import CorpusFiles
from dpmega.data.text import default_cache_dir
from dpmega.data.text import stdlib_files
from dpmega.data.wordpiece import train_wordpiece

BUILDER_VERSION = 2  # bump when a filter changes: it is part of the cache key

STDLIB = "stdlib"  # the pseudo-package of the running Python's standard library

# Our own code is not "text no one here wrote"; the others are not packages of prose.
_SKIP_PACKAGES = frozenset({"dpmega", "tests", "test", "docs", "pip", "setuptools", "pkg_resources",
                            "_distutils_hack"})
_SKIP_DIRS = frozenset({"test", "tests", "testing", "_vendor", "vendor", "__pycache__", "benchmarks"})
_MIN_PARAGRAPH_CHARS = 40
_MIN_LETTER_FRACTION = 0.6  # drops code, tables and dumps: prose is mostly letters
_CODE = re.compile(r"^\s*(>>>|\.\.\.|\$ |In \[)|::\s*$|^\s*[-=~^`*#+]{4,}\s*$", re.M)


# ----------------------------------------------------------------------------- harvesting


def installed_packages(site_dir: str | os.PathLike | None = None) -> list[str]:
  """Top-level packages (directories with Python files) of ``site_dir``, sorted; our own and tooling skipped.

  Args:
    site_dir: a site-packages directory; ``None``: the running interpreter's ``purelib``.
  """
  root = pathlib.Path(site_dir if site_dir is not None else sysconfig.get_paths()["purelib"])
  names = []
  for p in sorted(root.iterdir()):
    if (p.is_dir() and p.name.isidentifier() and not p.name.startswith("_") and p.name not in _SKIP_PACKAGES
        and (p / "__init__.py").is_file()):
      names.append(p.name)
  return names


def _package_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The package's ``.py``, ``.md`` and ``.rst`` files in sorted order, test and vendored trees skipped."""
  out = []
  for q in sorted(directory.rglob("*")):
    rel = q.relative_to(directory)
    if q.suffix in (".py", ".md", ".rst") and q.is_file() and not _SKIP_DIRS & set(rel.parts[:-1]):
      if not q.name.startswith("test_"):
        out.append(q)
  return out


def _source_files(package: str, site_dir) -> list[pathlib.Path]:
  """The files harvested for ``package``; for :data:`STDLIB` those of :func:`dpmega.data.text.stdlib_docstrings`."""
  if package == STDLIB:
    return [path for _, path in stdlib_files()]
  root = pathlib.Path(site_dir if site_dir is not None else sysconfig.get_paths()["purelib"])
  return _package_files(root / package)


def _file_documents(path: pathlib.Path) -> Iterator[str]:
  """The docstrings of a ``.py`` file (module, classes, functions), or the whole text of a ``.md``/``.rst``."""
  try:
    source = path.read_text(encoding="utf-8")
  except (UnicodeDecodeError, OSError):
    return
  if path.suffix != ".py":
    yield source
    return
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        yield doc


def paragraphs(document: str) -> list[str]:
  """The prose paragraphs of a document (blank-line separated), whitespace collapsed, code and tables dropped.

  A paragraph is kept when it has at least 40 characters, is at least 60% letters, and holds no doctest
  (``>>>``), shell prompt, reStructuredText literal-block marker (``::`` at a line end) or rule line.

  >>> paragraphs("Returns the sum of the elements.\\n\\n>>> np.sum([1, 2])\\n3\\n\\nComputes the sum of array "
  ...            "elements over a given axis.")
  ['Computes the sum of array elements over a given axis.']
  """
  out = []
  for block in re.split(r"\n\s*\n", document):
    if _CODE.search(block):
      continue
    text = " ".join(block.split())
    letters = sum(c.isalpha() for c in text)
    if len(text) >= _MIN_PARAGRAPH_CHARS and letters >= _MIN_LETTER_FRACTION * len(text):
      out.append(text)
  return out


def near_duplicate_key(paragraph: str) -> str:
  """The form two near-exact copies share: lower case, letters only, single spaces.

  >>> near_duplicate_key("Returns: the array's 2 axes.") == near_duplicate_key("returns the  array-s 3 AXES")
  True
  """
  return " ".join(re.sub(r"[^a-z]+", " ", paragraph.lower()).split())


def package_documents(package: str, site_dir: str | os.PathLike | None = None) -> Iterator[list[str]]:
  """The documents of ``package`` (or :data:`STDLIB`), each as its list of prose paragraphs (maybe empty)."""
  for path in _source_files(package, site_dir):
    for doc in _file_documents(path):
      yield paragraphs(doc)


# ----------------------------------------------------------------------------- the corpus


@dataclasses.dataclass(frozen=True)
class PackageCorpus:
  """The corpus files and what went into them (also in ``manifest.json`` beside them)."""

  files: CorpusFiles
  train_packages: tuple[str, ...]
  eval_packages: tuple[str, ...]
  stats: dict  # documents, paragraphs, characters per part; duplicates dropped; sha256 of the files


def _dedup(packages: Sequence[str], site_dir) -> tuple[dict[str, list[list[str]]], int]:
  """Per package its documents with every paragraph seen before (normalized, any package) dropped."""
  seen: set[bytes] = set()
  dropped = 0
  out = {}
  for package in packages:
    docs = []
    for doc in package_documents(package, site_dir):
      kept = []
      for p in doc:
        key = hashlib.sha256(near_duplicate_key(p).encode()).digest()[:16]
        if key in seen:
          dropped += 1
          continue
        seen.add(key)
        kept.append(p)
      if kept:
        docs.append(kept)
    out[package] = docs
  return out, dropped


def distribution_of(package: str, site_dir=None) -> str:
  """The distribution that installs ``package`` (``attr`` and ``attrs`` are both ``attrs``), else its name.

  The split's unit: two top-level names of one distribution never land in different parts.
  """
  if site_dir is None and package != STDLIB:
    dists = importlib.metadata.packages_distributions().get(package)
    if dists:
      return sorted(dists)[0]
  return package


def split_packages(sizes: dict[str, int], eval_percent: int,
                   groups: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
  """(train, eval) package names: eval takes whole groups, in order of a hash of the group name, up to the target.

  Packages of one group (a distribution: ``groups[name]``, default the name itself) go together. A group joins
  eval when it fits under ``eval_percent`` of the total size, until eval holds 80% of that target; the rest is
  train. Deterministic in the names and sizes only.

  >>> split_packages({"a": 50, "b": 40, "c": 5, "d": 5}, 10)
  (['a', 'b'], ['c', 'd'])
  >>> split_packages({"a": 50, "b": 40, "c": 5, "d": 5}, 10, groups={"c": "a"})
  (['a', 'b', 'c'], ['d'])
  """
  groups = {n: (groups or {}).get(n, n) for n in sizes}
  group_sizes: dict[str, int] = {}
  for name, size in sizes.items():
    group_sizes[groups[name]] = group_sizes.get(groups[name], 0) + size
  target = eval_percent / 100 * sum(sizes.values())
  held = 0
  eval_groups = set()
  for group in sorted(group_sizes, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
    if held >= 0.8 * target:
      break
    if group_sizes[group] and held + group_sizes[group] <= target:
      eval_groups.add(group)
      held += group_sizes[group]
  return (sorted(n for n in sizes if groups[n] not in eval_groups),
          sorted(n for n in sizes if groups[n] in eval_groups))


def _write(path: pathlib.Path, docs: Iterable[list[str]]) -> str:
  """Writes documents (a line per paragraph, blank lines between), atomically; returns the file's sha256."""
  text = "\n\n".join("\n".join(d) for d in docs) + "\n"
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)
  return hashlib.sha256(text.encode()).hexdigest()


def _inputs_key(packages: Sequence[str], site_dir, vocab_size: int, eval_percent: int) -> str:
  """A cache key over what the corpus is built from: every harvested file's path, size and mtime."""
  h = hashlib.sha256(repr((BUILDER_VERSION, sys.version_info[:2], vocab_size, eval_percent)).encode())
  for package in packages:
    h.update(package.encode())
    for q in _source_files(package, site_dir):
      st = q.stat()
      h.update(f"{q}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def prepare_package_corpus(
    directory: str | os.PathLike | None = None,
    *,
    packages: Sequence[str] = (),
    vocab_size: int = 4096,
    eval_percent: int = 10,
    site_dir: str | os.PathLike | None = None,
) -> PackageCorpus:
  """Writes the installed-packages corpus (train/eval text files, manifest) and trains its vocabulary.

  Files go once under ``directory/packages-<key>/`` (the key covers the inputs: every harvested file's path,
  size and modification time, the filters' version, ``vocab_size`` and ``eval_percent``) and are reused.

  Args:
    directory: where to cache; ``None``: :func:`dpmega.data.text.default_cache_dir` ``/text``.
    packages: top-level package names to harvest (``"stdlib"``: the standard library); empty: every package
      of :func:`installed_packages` plus the standard library.
    vocab_size: WordPiece vocabulary size (trained on the train part only).
    eval_percent: about this percent of the text (whole packages) is held out, in [1, 50].
    site_dir: the site-packages directory to read (``None``: the running interpreter's).

  Returns:
    :class:`PackageCorpus`.

  Raises:
    ValueError: a bad argument, a package that is not installed, or a split with an empty part.
  """
  if isinstance(eval_percent, bool) or not isinstance(eval_percent, int) or not 1 <= eval_percent <= 50:
    raise ValueError(f"eval_percent must be an int in [1, 50], got {eval_percent=!r}.")
  available = installed_packages(site_dir)
  packages = sorted(set(packages)) if packages else available + [STDLIB]
  unknown = [p for p in packages if p != STDLIB and p not in available]
  if unknown:
    raise ValueError(f"packages must be installed top-level packages or 'stdlib', got {unknown}; installed: "
                     f"{available}.")
  base = pathlib.Path(directory) if directory is not None else default_cache_dir() / "text"
  out = base / f"packages-{_inputs_key(packages, site_dir, vocab_size, eval_percent)}"
  files = CorpusFiles(out / "train.txt", out / "eval.txt", out / "vocab.txt")
  manifest = out / "manifest.json"
  if all(p.is_file() for p in (files.train, files.eval, files.vocab, manifest)):
    m = json.loads(manifest.read_text())
    return PackageCorpus(files, tuple(m["train_packages"]), tuple(m["eval_packages"]), m["stats"])
  out.mkdir(parents=True, exist_ok=True)
  docs, dropped = _dedup(packages, site_dir)
  sizes = {p: sum(len(x) for d in ds for x in d) for p, ds in docs.items()}
  train_names, eval_names = split_packages(sizes, eval_percent, {p: distribution_of(p, site_dir) for p in packages})
  if not eval_names or not any(sizes[p] for p in train_names):
    raise ValueError(f"packages {packages} cannot be split by package into non-empty train and eval parts at "
                     f"{eval_percent=} (sizes in characters: {sizes}).")
  stats: dict = {"duplicate_paragraphs_dropped": dropped, "builder_version": BUILDER_VERSION}
  for part, names, path in (("train", train_names, files.train), ("eval", eval_names, files.eval)):
    part_docs = [d for p in names for d in docs[p]]
    stats[part] = {"documents": len(part_docs), "paragraphs": sum(map(len, part_docs)),
                   "characters": sum(sizes[p] for p in names), "sha256": _write(path, part_docs)}
  vocab_tmp = train_wordpiece([files.train], out / f"vocab_tmp{os.getpid()}", vocab_size=vocab_size)
  os.replace(vocab_tmp, files.vocab)
  os.rmdir(vocab_tmp.parent)
  record = {"train_packages": train_names, "eval_packages": eval_names, "stats": stats,
            "package_characters": sizes, "distributions": {p: distribution_of(p, site_dir) for p in packages}}
  tmp = manifest.with_suffix(f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(record, indent=1))
  os.replace(tmp, manifest)
  return PackageCorpus(files, tuple(train_names), tuple(eval_names), stats)
