"""Text for masked-LM pretraining: WordPiece, packing, dynamic masking, sources.

The pipeline, one way::

  documents (text files | TFDS | stdlib docstrings)
    -> WordPiece ids (HuggingFace ``tokenizers``; a BERT ``vocab.txt`` works)
    -> packed rows [n, seq_len]: [CLS] doc [SEP] doc [SEP] ... (no row padding
       except the last row), written once to a flat int32 file
    -> ``ArraySource({"input_ids": memmap})``  (what the samplers read at random)
    -> per micro-batch, from the step's key: :func:`mask_tokens` picks 15% of
       the real tokens; 80% become [MASK], 10% a random token, 10% stay.

Privacy: one packed row is one example (the unit DP protects). Masking is
drawn independently for each row from a key that does not depend on the data,
so it is part of the per-example loss, not a release; rows that are padding of
the sampler (all [PAD]) get no prediction slots and contribute zero.

The demo and test corpus (:func:`prepare_stdlib_corpus`) is the English prose
of the running Python's standard-library docstrings, harvested on the fly into
a cache directory and never shipped; its WordPiece vocabulary is trained there.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import pathlib
import sys
import sysconfig
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpmega.data.sources import ArraySource

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Packages of the standard library that hold tests, demos or GUI code rather
# than documented APIs; their docstrings are not prose worth learning from.
_STDLIB_SKIP = frozenset({
    "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "this", "antigravity",
})


# ----------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the special tokens in a vocabulary."""

  pad: int
  unk: int
  cls: int
  sep: int
  mask: int

  @property
  def all(self) -> tuple[int, ...]:
    return (self.pad, self.unk, self.cls, self.sep, self.mask)


class WordPiece:
  """A BERT WordPiece tokenizer (HuggingFace ``tokenizers``) and its special ids.

  Args:
    vocab_path: a BERT ``vocab.txt`` (one token per line, the id is the line
      number); must contain ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
    lowercase: lower-case and strip accents (``True`` for "uncased" vocabularies).

  Raises:
    ValueError: naming ``vocab_path`` if the file is missing or lacks a special token.
  """

  def __init__(self, vocab_path: str | os.PathLike, *, lowercase: bool = True):
    path = pathlib.Path(vocab_path)
    if not path.is_file():
      raise ValueError(f"vocab_path must be an existing vocab.txt file, got {str(path)!r}.")
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top

    # vocab.txt: the id of a token is its line number.
    with open(path, encoding="utf-8") as f:
      vocab = {line.rstrip("\n"): i for i, line in reversed(list(enumerate(f)))}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise ValueError(f"vocab_path {str(path)!r} must contain the special tokens {SPECIAL_TOKENS}, missing {missing}.")
    self.vocab_path = path
    self.lowercase = lowercase
    self._tok = BertWordPieceTokenizer(str(path), lowercase=lowercase)
    self.special = SpecialIds(*(self._tok.token_to_id(t) for t in SPECIAL_TOKENS))
    self.vocab_size = self._tok.get_vocab_size()

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without [CLS]/[SEP] (packing adds them)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(int(i))


def train_wordpiece(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> pathlib.Path:
  """Trains a WordPiece vocabulary on text files and writes ``out_dir/vocab.txt``.

  The five special tokens get ids 0..4 in :data:`SPECIAL_TOKENS` order.

  .. warning::
     A vocabulary trained on the private corpus is itself a function of the
     private data and is not covered by the DP guarantee of training. For a
     formal guarantee, train it on public text (as the demo does) or use a
     public ``vocab.txt``.

  Returns:
    The path of the written ``vocab.txt``.
  """
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS) + 1:
    raise ValueError(f"vocab_size must be an int >= {len(SPECIAL_TOKENS) + 1}, got {vocab_size=!r}.")
  files = [str(f) for f in files]
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"files must be existing text files, got {f!r}.")
  from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok = BertWordPieceTokenizer(lowercase=lowercase)
  tok.train(files, vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=list(SPECIAL_TOKENS))
  tok.save_model(str(out))
  return out / "vocab.txt"


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


def stdlib_docstrings(min_chars: int = 40) -> list[tuple[str, str]]:
  """``(module, docstring)`` of the running Python's standard library, in a fixed order.

  Module, class and function docstrings of ``sys.stdlib_module_names`` (pure
  Python files only, test and GUI packages skipped), each with its whitespace
  collapsed. Real English prose available offline wherever Python is; its
  exact content depends on the Python version.
  """
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
  out = []
  for module, path in files:
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


# ----------------------------------------------------------------------------- masking


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Dynamic masking as in BERT (Devlin et al. 2019, section 3.1).

  Attributes:
    mask_rate: fraction of the maskable tokens of a row chosen for prediction
      (rounded; at least 1 if the row has any; at most ``max_predictions``).
    max_predictions: prediction slots per row (BERT: 20 for length 128).
    mask_token_prob: of the chosen tokens, the fraction replaced by [MASK].
    random_token_prob: the fraction replaced by a uniformly random non-special
      token; the rest are left unchanged (but still predicted).
  """

  mask_rate: float = 0.15
  max_predictions: int = 20
  mask_token_prob: float = 0.8
  random_token_prob: float = 0.1

  def __post_init__(self):
    if not 0.0 < self.mask_rate <= 1.0:
      raise ValueError(f"mask_rate must be in (0, 1], got {self.mask_rate=}.")
    if isinstance(self.max_predictions, bool) or not isinstance(self.max_predictions, int) or self.max_predictions < 1:
      raise ValueError(f"max_predictions must be an int >= 1, got {self.max_predictions=!r}.")
    if not (0.0 <= self.mask_token_prob <= 1.0 and 0.0 <= self.random_token_prob <= 1.0
            and self.mask_token_prob + self.random_token_prob <= 1.0):
      raise ValueError(
          "mask_token_prob and random_token_prob must be in [0, 1] with a sum <= 1, got "
          f"{self.mask_token_prob=}, {self.random_token_prob=}.")


@functools.partial(jax.jit, static_argnames=("config", "special", "vocab_size"))
def mask_tokens(
    input_ids: jax.Array,
    key: jax.Array,
    *,
    config: MaskingConfig,
    special: SpecialIds,
    vocab_size: int,
) -> dict[str, jax.Array]:
  """Chooses and corrupts the tokens to predict in each row; one key for the whole batch.

  Maskable tokens are those other than [PAD], [CLS] and [SEP]. In a row with
  ``n`` of them, exactly ``k = min(max_predictions, max(1, round(mask_rate *
  n)))`` distinct positions are chosen uniformly at random (``k = 0`` when
  ``n = 0``, e.g. a padding row). Each chosen token independently becomes
  [MASK] with probability ``mask_token_prob``, a uniformly random non-special
  token with probability ``random_token_prob``, and stays otherwise.

  Args:
    input_ids: ``[..., T]`` int token ids (packed rows).
    key: PRNG key (a fresh one per step and micro-batch).
    config: :class:`MaskingConfig`; ``max_predictions <= T``.
    special: the vocabulary's :class:`SpecialIds`.
    vocab_size: ids are in ``[0, vocab_size)``.

  Returns:
    ``{"input_ids": [..., T] corrupted ids, "mlm_positions": [..., P],
    "mlm_labels": [..., P] original ids, "mlm_weights": [..., P] float32 1 for a
    used slot, 0 for an unused one}`` with ``P = max_predictions``; unused
    slots have position 0 and label 0.

  Example:
    >>> import jax, numpy as np
    >>> ids = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    >>> row = np.array([[2] + list(range(5, 25)) + [3, 0, 0]])  # 20 maskable tokens
    >>> out = mask_tokens(row, jax.random.key(0), config=MaskingConfig(max_predictions=5),
    ...                   special=ids, vocab_size=30)
    >>> out["mlm_weights"].tolist()  # round(0.15 * 20) = 3 slots used
    [[1.0, 1.0, 1.0, 0.0, 0.0]]
  """
  ids = jnp.asarray(input_ids).astype(jnp.int32)
  t = ids.shape[-1]
  p = config.max_predictions
  if p > t:
    raise ValueError(f"max_predictions must be <= the sequence length {t}, got {config.max_predictions=}.")
  k_select, k_mode, k_random = jax.random.split(key, 3)
  maskable = (ids != special.pad) & (ids != special.cls) & (ids != special.sep)
  n = jnp.sum(maskable, axis=-1)
  k = jnp.round(config.mask_rate * n.astype(jnp.float32)).astype(jnp.int32)
  k = jnp.where(n > 0, jnp.clip(k, 1, p), 0)
  # Uniform scores on maskable tokens, -1 elsewhere: the top p scores are a
  # uniformly random ordering of the maskable positions (then the others);
  # the first k of them are a uniformly random k-subset.
  scores = jnp.where(maskable, jax.random.uniform(k_select, ids.shape), -1.0)
  _, positions = jax.lax.top_k(scores, p)
  weights = (jnp.arange(p) < k[..., None]).astype(jnp.float32)
  used = weights > 0
  labels = jnp.take_along_axis(ids, positions, axis=-1)

  normal = np.setdiff1d(np.arange(vocab_size), np.asarray(special.all))
  if normal.size == 0:
    raise ValueError(f"vocab_size must leave at least one non-special token, got {vocab_size=}.")
  random_tokens = jnp.asarray(normal, jnp.int32)[jax.random.randint(k_random, positions.shape, 0, normal.size)]
  u = jax.random.uniform(k_mode, positions.shape)
  new_tokens = jnp.where(
      u < config.mask_token_prob, special.mask,
      jnp.where(u < config.mask_token_prob + config.random_token_prob, random_tokens, labels))
  # Positions are distinct, so a one-hot scatter over [P, T] is exact.
  hit = (positions[..., :, None] == jnp.arange(t)) & used[..., :, None]
  replaced = jnp.sum(jnp.where(hit, new_tokens[..., :, None], 0), axis=-2)
  corrupted = jnp.where(jnp.any(hit, axis=-2), replaced, ids)
  return {
      "input_ids": corrupted,
      "mlm_positions": jnp.where(used, positions, 0).astype(jnp.int32),
      "mlm_labels": jnp.where(used, labels, 0).astype(jnp.int32),
      "mlm_weights": weights,
  }


def unigram_counts(source: ArraySource, *, vocab_size: int, special: SpecialIds, chunk: int = 4096) -> np.ndarray:
  """Counts of each maskable token id over a packed source (specials counted 0)."""
  counts = np.zeros((vocab_size,), np.int64)
  ids = source.arrays["input_ids"]
  for start in range(0, len(source), chunk):
    counts += np.bincount(np.asarray(ids[start:start + chunk]).ravel(), minlength=vocab_size)[:vocab_size]
  counts[[special.pad, special.cls, special.sep]] = 0
  return counts
