"""Text for masked-LM pretraining: documents in, packed rows of token ids out, read at random.

The pipeline, one way::

  documents (text files | TFDS | stdlib docstrings)
    -> WordPiece ids (:mod:`dpmega.data.wordpiece`; a BERT ``vocab.txt`` works)
    -> packed rows [n, seq_len]: [CLS] doc [SEP] doc [SEP] ... (no row padding
       except the last row), written once to a flat int32 file
    -> ``ArraySource({"input_ids": memmap})``  (what the samplers read at random)
    -> per micro-batch, from the step's key: dynamic masking
       (:func:`dpmega.data.masking.mask_tokens`).

Privacy: one packed row is one example (the unit DP protects).

The demo and test corpus (:func:`prepare_stdlib_corpus`) is the English prose
of the running Python's standard-library docstrings, harvested on the fly into
a cache directory and never shipped; its WordPiece vocabulary is trained there.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import pathlib
import sys
import sysconfig
from typing import Iterable, Iterator, Sequence

import numpy as np

from dpmega.data.sources import ArraySource
from dpmega.data.wordpiece import SpecialIds
from dpmega.data.wordpiece import WordPiece
from dpmega.data.wordpiece import train_wordpiece

# Packages of the standard library that hold tests, demos or GUI code rather
# than documented APIs; their docstrings are not prose worth learning from.
_STDLIB_SKIP = frozenset({
    "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "this", "antigravity",
})


# ----------------------------------------------------------------------------- documents


def read_documents(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
  """Documents of plain text files: separated by blank lines, lines of one joined by spaces.

  This is the format of BERT's ``create_pretraining_data.py`` input (one
  sentence or paragraph per line, a blank line between documents); a file with
  one document per line and no blank lines is read as one long document, which
  packing handles the same way.
  """
  for p in paths:
    if not os.path.isfile(p):
      raise ValueError(f"paths must be existing text files, got {str(p)!r}.")
    lines: list[str] = []
    with open(p, encoding="utf-8", errors="replace") as f:
      for line in f:
        line = line.strip()
        if line:
          lines.append(line)
        elif lines:
          yield " ".join(lines)
          lines = []
    if lines:
      yield " ".join(lines)


def stdlib_files() -> list[tuple[str, pathlib.Path]]:
  """``(module, path)`` of the pure-Python files of ``sys.stdlib_module_names``, sorted; tests and GUI skipped."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files: list[tuple[str, pathlib.Path]] = []
  for name in sorted(sys.stdlib_module_names):
    if name in _STDLIB_SKIP:
      continue
    single = root / f"{name}.py"
    if single.is_file():
      files.append((name, single))
    pkg = root / name
    if pkg.is_dir():
      for q in sorted(pkg.rglob("*.py")):
        rel = q.relative_to(root)
        if not {"test", "tests"} & set(rel.parts):
          files.append((".".join(rel.with_suffix("").parts), q))
  return files


def stdlib_docstrings(min_chars: int = 40) -> list[tuple[str, str]]:
  """``(module, docstring)`` of the running Python's standard library, in a fixed order.

  Module, class and function docstrings of :func:`stdlib_files`, each with its
  whitespace collapsed. Real English prose available offline wherever Python
  is; its exact content depends on the Python version.
  """
  out = []
  for module, path in stdlib_files():
    try:
      tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= min_chars:
          out.append((module, " ".join(doc.split())))
  return out


@dataclasses.dataclass(frozen=True)
class CorpusFiles:
  """A train/eval split of a text corpus and the vocabulary trained on its train part."""

  train: pathlib.Path
  eval: pathlib.Path
  vocab: pathlib.Path


def default_cache_dir() -> pathlib.Path:
  """``$DPMEGA_CACHE_DIR`` or ``~/.cache/dpmega``."""
  return pathlib.Path(os.environ.get("DPMEGA_CACHE_DIR", pathlib.Path.home() / ".cache" / "dpmega"))


def _eval_module(module: str, eval_percent: int) -> bool:
  digest = hashlib.sha256(module.split(".")[0].encode()).digest()
  return digest[0] * 100 // 256 < eval_percent


def prepare_stdlib_corpus(
    directory: str | os.PathLike | None = None,
    *,
    vocab_size: int = 4096,
    eval_percent: int = 10,
) -> CorpusFiles:
  """Writes the stdlib-docstring corpus (train/eval text files) and trains its vocabulary.

  Documents are split by top-level module (hash of its name), so no module's
  prose is in both parts. Files are written once under
  ``directory/stdlib-<python version>-v<vocab_size>-e<eval_percent>/`` and
  reused on later calls.

  Args:
    directory: where to cache; ``None``: :func:`default_cache_dir` ``/text``.
    vocab_size: WordPiece vocabulary size (trained on the train part only).
    eval_percent: percent of top-level modules held out, in [1, 50].

  Returns:
    :class:`CorpusFiles`.
  """
  if isinstance(eval_percent, bool) or not isinstance(eval_percent, int) or not 1 <= eval_percent <= 50:
    raise ValueError(f"eval_percent must be an int in [1, 50], got {eval_percent=!r}.")
  base = pathlib.Path(directory) if directory is not None else default_cache_dir() / "text"
  tag = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}-e{eval_percent}"
  out = base / tag
  files = CorpusFiles(out / "train.txt", out / "eval.txt", out / "vocab.txt")
  if all(p.is_file() for p in (files.train, files.eval, files.vocab)):
    return files
  out.mkdir(parents=True, exist_ok=True)
  docs = stdlib_docstrings()
  parts = {True: [], False: []}
  for module, doc in docs:
    parts[_eval_module(module, eval_percent)].append(doc)
  # Write to temporary names first so a concurrent or interrupted run never
  # leaves a half-written file that a later call would take as complete.
  for path, texts in ((files.train, parts[False]), (files.eval, parts[True])):
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    os.replace(tmp, path)
  vocab_tmp = train_wordpiece([files.train], out / f"vocab_tmp{os.getpid()}", vocab_size=vocab_size)
  os.replace(vocab_tmp, files.vocab)
  os.rmdir(vocab_tmp.parent)
  return files


# ----------------------------------------------------------------------------- packing


def pack_ids(
    docs: Iterable[Sequence[int]],
    *,
    seq_len: int,
    special: SpecialIds,
) -> Iterator[np.ndarray]:
  """Packs token-id documents into rows ``[CLS] t ... t`` of exactly ``seq_len``.

  Documents are concatenated, each followed by [SEP], and the stream is cut
  into chunks of ``seq_len - 1`` tokens, each after a [CLS]. A document may
  continue on the next row. Only the last row is padded with [PAD]; a last
  chunk with no real token (only a [SEP]) is dropped. Empty documents are
  skipped.

  Yields:
    int32 arrays of shape ``[seq_len]``.
  """
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f"seq_len must be an int >= 2, got {seq_len=!r}.")
  body = seq_len - 1
  buf: list[int] = []
  for ids in docs:
    if len(ids) == 0:
      continue
    buf.extend(int(i) for i in ids)
    buf.append(special.sep)
    while len(buf) >= body:
      yield np.asarray([special.cls] + buf[:body], np.int32)
      del buf[:body]
  if any(t != special.sep for t in buf):
    row = np.full((seq_len,), special.pad, np.int32)
    row[0] = special.cls
    row[1:1 + len(buf)] = buf
    yield row


def pack_to_file(
    texts: Iterable[str],
    path: str | os.PathLike,
    tokenizer: WordPiece,
    *,
    seq_len: int,
    batch_size: int = 1024,
    max_rows: int | None = None,
) -> int:
  """Tokenizes and packs a stream of documents into a flat int32 file; returns the row count.

  Streams: memory is bounded by ``batch_size`` documents whatever the corpus
  size, so the same code prepares a CPU demo and a pretraining corpus. Read
  the file back with :func:`packed_source`.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")

  def encoded() -> Iterator[list[int]]:
    chunk: list[str] = []
    for t in texts:
      chunk.append(t)
      if len(chunk) == batch_size:
        yield from tokenizer.encode(chunk)
        chunk = []
    if chunk:
      yield from tokenizer.encode(chunk)

  rows = 0
  with open(tmp, "wb") as f:
    for row in pack_ids(encoded(), seq_len=seq_len, special=tokenizer.special):
      f.write(row.tobytes())
      rows += 1
      if max_rows is not None and rows >= max_rows:
        break
  os.replace(tmp, path)
  return rows


def packed_source(path: str | os.PathLike, *, seq_len: int) -> ArraySource:
  """``ArraySource({"input_ids": [n, seq_len] int32 memmap})`` over a file from :func:`pack_to_file`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"path must be a packed-ids file written by pack_to_file, got {str(path)!r}.")
  size = path.stat().st_size
  if size == 0 or size % (4 * seq_len):
    raise ValueError(f"the file {str(path)!r} ({size} bytes) does not hold int32 rows of {seq_len=}.")
  ids = np.memmap(path, dtype=np.int32, mode="r", shape=(size // (4 * seq_len), seq_len))
  return ArraySource({"input_ids": ids})


def text_file_source(
    paths: Sequence[str | os.PathLike],
    tokenizer: WordPiece,
    *,
    seq_len: int,
    cache_path: str | os.PathLike,
    max_rows: int | None = None,
) -> ArraySource:
  """Packed rows of plain text files (see :func:`read_documents`), cached at ``cache_path``.

  The cache is rebuilt when it is missing; delete it after changing the
  inputs (its name should encode them, as :func:`cache_name` does).
  """
  cache_path = pathlib.Path(cache_path)
  if not cache_path.is_file():
    pack_to_file(read_documents(paths), cache_path, tokenizer, seq_len=seq_len, max_rows=max_rows)
  return packed_source(cache_path, seq_len=seq_len)


def tfds_documents(
    name: str,
    *,
    split: str,
    feature: str = "text",
    data_dir: str | None = None,
    max_documents: int | None = None,
) -> Iterator[str]:
  """Texts of a TFDS dataset read through ``tfds.data_source`` (random access, no TensorFlow).

  Args:
    name: TFDS name (e.g. ``"wikipedia/20230601.en"``, ``"tiny_shakespeare"``).
    split: TFDS split string (``"train"``, ``"train[:1%]"``, ...).
    feature: the text feature of an example.
    data_dir: TFDS data directory (``None``: TFDS default).
    max_documents: read at most this many examples.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("TFDS text sources need tensorflow-datasets: pip install tensorflow-datasets") from e
  ds = tfds.data_source(name, split=split, data_dir=data_dir)
  n = len(ds) if max_documents is None else min(len(ds), max_documents)
  for i in range(n):
    example = ds[i]
    if feature not in example:
      raise ValueError(f"feature must be one of {sorted(example)} for TFDS dataset {name!r}, got {feature=!r}.")
    text = example[feature]
    yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def cache_name(*parts: object) -> str:
  """A short stable file-name stem for a cache keyed by ``parts``."""
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]
