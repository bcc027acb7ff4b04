"""The ``bert_mlm`` task: a BERT masked-LM model on packed text, masked per micro-batch.

The model and its per-example loss are :mod:`dpmega.models.bert`; the text
pipeline is :mod:`dpmega.data.text` (documents -> packed rows),
:mod:`dpmega.data.wordpiece` (the vocabulary) and :mod:`dpmega.data.masking`
(dynamic masking, drawn in ``prepare_batch`` from the trainer's key). The
fields of ``config.task`` and their defaults are :func:`default_task_config`.
"""

from __future__ import annotations

import enum
import functools
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpmega import validation
from dpmega.data import masking as masking_lib
from dpmega.data import package_corpus
from dpmega.data import text
from dpmega.data import wordpiece
from dpmega.models import bert
from dpmega.tasks import Task

PyTree = Any

TASK_NAME = "bert_mlm"


class TextSourceKind(str, enum.Enum):
  """Where the task's text comes from."""

  STDLIB = "stdlib"  # docstrings of the running Python (public, offline; demo and tests)
  PACKAGES = "packages"  # docstrings and docs of the installed packages + stdlib (dpmega.data.package_corpus)
  TEXT = "text"  # plain text files: documents separated by blank lines
  TFDS = "tfds"  # a TFDS text dataset read through tfds.data_source


def default_task_config() -> ml_collections.ConfigDict:
  """``config.task`` of the ``bert_mlm`` task, every field with its default.

  Model: ``size`` (a :class:`dpmega.models.bert.Size`) with optional overrides (0 = the preset's):
  ``num_layers``, ``hidden_size``, ``num_heads``, ``intermediate_size``;
  ``tie_embeddings``; ``dtype`` (``"float32"`` or ``"bfloat16"``).
  Rows: ``seq_len``, ``mask_rate``, ``max_predictions`` (0: ``ceil(mask_rate *
  seq_len)``, BERT's 20 at 128).
  Data: ``source`` (a :class:`TextSourceKind`); ``train_files`` /
  ``eval_files`` for ``text``; ``corpus_packages`` (empty: all installed) and
  ``corpus_eval_percent``, ``corpus_site_dir`` (empty: this interpreter's
  site-packages) for ``packages`` (:mod:`dpmega.data.package_corpus`); ``tfds_name``, ``tfds_train_split``,
  ``tfds_eval_split``, ``tfds_feature``, ``tfds_data_dir`` for ``tfds``;
  ``vocab_path`` (a BERT ``vocab.txt``; empty: train one of ``vocab_size`` on
  the train text -- see the warning of :func:`dpmega.data.wordpiece.train_wordpiece`;
  required for ``tfds``), ``lowercase``; ``cache_dir`` (empty:
  ``$DPMEGA_CACHE_DIR`` or ``~/.cache/dpmega``); ``max_train_rows`` /
  ``max_eval_rows`` (0: all); ``eval_seed`` (the fixed masking of the eval
  rows); ``eval_batch_size``.
  """
  return ml_collections.ConfigDict({
      "name": TASK_NAME,
      "size": "tiny",
      "num_layers": 0,
      "hidden_size": 0,
      "num_heads": 0,
      "intermediate_size": 0,
      "tie_embeddings": True,
      "dtype": "float32",
      "seq_len": 32,
      "mask_rate": 0.15,
      "max_predictions": 0,
      "source": "stdlib",
      "train_files": (),
      "eval_files": (),
      "corpus_packages": (),
      "corpus_eval_percent": 10,
      "corpus_site_dir": "",
      "tfds_name": "",
      "tfds_train_split": "train",
      "tfds_eval_split": "validation",
      "tfds_feature": "text",
      "tfds_data_dir": "",
      "vocab_path": "",
      "vocab_size": 512,
      "lowercase": True,
      "cache_dir": "",
      "max_train_rows": 0,
      "max_eval_rows": 2048,
      "eval_seed": 0,
      "eval_batch_size": 256,
      # Informational: the N a config's privacy plan assumes before the data is read (0: none); the trainer
      # always plans with len(train_source).
      "planning_dataset_size": 0,
  })


def _task_int(cfg, name: str, lo: int, hi: int) -> int:
  return validation.check_int(f"task.{name}", cfg[name], lo, hi)


def _task_choice(cfg, name: str, enum_cls):
  return enum_cls(validation.check_choice(f"task.{name}", cfg[name], [e.value for e in enum_cls]))


def masking_config(task_cfg):
  """The :class:`dpmega.data.masking.MaskingConfig` of ``config.task``."""
  seq_len = _task_int(task_cfg, "seq_len", 8, 1 << 16)
  rate = validation.check_real("task.mask_rate", task_cfg.mask_rate, 0, 0.5, lo_open=True)
  p = _task_int(task_cfg, "max_predictions", 0, seq_len) or math.ceil(rate * seq_len)
  return masking_lib.MaskingConfig(mask_rate=rate, max_predictions=p)


def model_config(task_cfg, *, vocab_size: int, pad_id: int = 0) -> bert.BertConfig:
  """The :class:`dpmega.models.bert.BertConfig` of ``config.task`` for a vocabulary of ``vocab_size``."""
  size = _task_choice(task_cfg, "size", bert.Size)
  overrides = {k: _task_int(task_cfg, k, 0, 1 << 20)
               for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")}
  overrides = {k: v for k, v in overrides.items() if v}
  validation.check_bool("task.tie_embeddings", task_cfg.tie_embeddings)
  return bert.BertConfig.preset(
      size, vocab_size=vocab_size, max_len=_task_int(task_cfg, "seq_len", 8, 1 << 16),
      tie_embeddings=task_cfg.tie_embeddings, dtype=_task_choice(task_cfg, "dtype", bert.DType), pad_id=pad_id,
      **overrides)


def abstract_params(task_cfg, *, vocab_size: int) -> PyTree:
  """Shapes and dtypes of the parameters (``jax.ShapeDtypeStruct``), allocating nothing."""
  model = bert.BertMLM(model_config(task_cfg, vocab_size=vocab_size))
  masking = masking_config(task_cfg)
  return jax.eval_shape(
      lambda k: bert.init_params(model, k, seq_len=task_cfg.seq_len, max_predictions=masking.max_predictions),
      jax.random.key(0))


def _tokenizer_and_sources(task_cfg):
  """(tokenizer, train ArraySource, eval ArraySource) of ``config.task``, packing once into the cache."""
  kind = _task_choice(task_cfg, "source", TextSourceKind)
  seq_len = _task_int(task_cfg, "seq_len", 8, 1 << 16)
  cache = pathlib.Path(task_cfg.cache_dir) if task_cfg.cache_dir else text.default_cache_dir()
  max_train = _task_int(task_cfg, "max_train_rows", 0, 1 << 40) or None
  max_eval = _task_int(task_cfg, "max_eval_rows", 0, 1 << 40) or None
  vocab_size = _task_int(task_cfg, "vocab_size", len(wordpiece.SPECIAL_TOKENS) + 1, 1 << 22)
  vocab_path = task_cfg.vocab_path
  if kind == TextSourceKind.STDLIB:
    corpus = text.prepare_stdlib_corpus(cache / "text", vocab_size=vocab_size)
    train_docs = lambda: text.read_documents([corpus.train])
    eval_docs = lambda: text.read_documents([corpus.eval])
    vocab_path = vocab_path or corpus.vocab
    identity = ("stdlib", str(corpus.train))
  elif kind == TextSourceKind.PACKAGES:
    corpus = package_corpus.prepare_package_corpus(
        cache / "text", packages=tuple(map(str, task_cfg.corpus_packages)), vocab_size=vocab_size,
        eval_percent=_task_int(task_cfg, "corpus_eval_percent", 1, 50),
        site_dir=str(task_cfg.corpus_site_dir) or None).files
    train_docs = lambda: text.read_documents([corpus.train])
    eval_docs = lambda: text.read_documents([corpus.eval])
    vocab_path = vocab_path or corpus.vocab
    identity = ("packages", str(corpus.train))
  elif kind == TextSourceKind.TEXT:
    train_files = tuple(map(str, task_cfg.train_files))
    eval_files = tuple(map(str, task_cfg.eval_files))
    if not train_files or not eval_files:
      raise ValueError("task.train_files and task.eval_files must each name at least one text file "
                       f"for source='text', got {train_files=} {eval_files=}.")
    for f in train_files + eval_files:
      if not os.path.isfile(f):
        raise ValueError(f"task.train_files/eval_files must be existing files, got {f!r}.")
    train_docs = lambda: text.read_documents(train_files)
    eval_docs = lambda: text.read_documents(eval_files)
    if not vocab_path:
      stats = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in train_files)
      vocab_path = wordpiece.train_wordpiece(train_files, cache / "text" / "vocab" / text.cache_name(stats, vocab_size),
                                        vocab_size=vocab_size, lowercase=task_cfg.lowercase)
    identity = ("text", tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in train_files + eval_files))
  else:
    if not task_cfg.tfds_name:
      raise ValueError("task.tfds_name must name a TFDS text dataset for source='tfds', got ''.")
    if not vocab_path:
      raise ValueError("task.vocab_path must be a BERT vocab.txt for source='tfds', got ''.")
    data_dir = task_cfg.tfds_data_dir or None

    def docs(split, limit):
      return lambda: text.tfds_documents(task_cfg.tfds_name, split=split, feature=task_cfg.tfds_feature,
                                         data_dir=data_dir, max_documents=limit)

    # Rows hold several documents; a document-count cap of the row cap
    # bounds the reading for small demos.
    train_docs = docs(task_cfg.tfds_train_split, max_train)
    eval_docs = docs(task_cfg.tfds_eval_split, max_eval)
    identity = ("tfds", task_cfg.tfds_name, task_cfg.tfds_train_split, task_cfg.tfds_eval_split,
                task_cfg.tfds_feature, data_dir)
  tokenizer = wordpiece.WordPiece(vocab_path, lowercase=task_cfg.lowercase)
  vocab_id = (str(vocab_path), os.stat(vocab_path).st_size, os.stat(vocab_path).st_mtime_ns, task_cfg.lowercase)
  sources = []
  for part, make_docs, limit in (("train", train_docs, max_train), ("eval", eval_docs, max_eval)):
    path = cache / "text" / "packed" / f"{part}-{text.cache_name(identity, vocab_id, seq_len, limit)}.bin"
    if not path.is_file():
      rows = text.pack_to_file(make_docs(), path, tokenizer, seq_len=seq_len, max_rows=limit)
      if rows == 0:
        path.unlink()
        raise ValueError(f"the {part} text of task.source={kind.value!r} produced no rows of {seq_len=}.")
    sources.append(text.packed_source(path, seq_len=seq_len))
  return tokenizer, sources[0], sources[1]


def build_task(config: Any) -> Task:
  """The ``bert_mlm`` task (see :func:`default_task_config`) for :mod:`dpmega.train`.

  Per micro-batch, ``prepare_batch`` draws the masking from the trainer's key
  (fresh for every step and micro-batch); evaluation masks the eval rows once
  with ``task.eval_seed`` so that every evaluation sees the same positions.
  ``evaluate`` returns ``mlm_accuracy`` (argmax correct over masked positions,
  pooled over the eval rows), ``mlm_loss`` (mean cross-entropy per masked
  position) and ``unigram_accuracy``: the best constant prediction's accuracy
  on the same masked eval positions (the baseline a model must beat to use
  context), computed from the eval split only.
  """
  task_cfg = config.task
  masking = masking_config(task_cfg)
  tokenizer, train_source, eval_source = _tokenizer_and_sources(task_cfg)
  special, vocab_size = tokenizer.special, tokenizer.vocab_size
  model = bert.BertMLM(model_config(task_cfg, vocab_size=vocab_size, pad_id=special.pad))
  seq_len = task_cfg.seq_len
  eval_batch = _task_int(task_cfg, "eval_batch_size", 1, 1 << 20)

  def init(key):
    return bert.init_params(model, key, seq_len=seq_len, max_predictions=masking.max_predictions)

  loss_fn = functools.partial(bert.mlm_loss, model)

  def prepare_batch(batch, key):
    return masking_lib.mask_tokens(batch["input_ids"], key, config=masking, special=special, vocab_size=vocab_size)

  eval_ids = np.asarray(eval_source.arrays["input_ids"])
  eval_rows = prepare_batch({"input_ids": eval_ids}, jax.random.key(_task_int(task_cfg, "eval_seed", 0, 2**31 - 1)))
  eval_rows = jax.device_get(eval_rows)
  labels = eval_rows["mlm_labels"][eval_rows["mlm_weights"] > 0]
  unigram = float(np.bincount(labels).max() / max(labels.size, 1)) if labels.size else 0.0

  @jax.jit
  def eval_sums(params, rows):
    losses, aux = jax.vmap(loss_fn, in_axes=(None, 0))(params, rows)
    return jnp.sum(losses * aux["count"]), jnp.sum(aux["correct"]), jnp.sum(aux["count"])

  def evaluate(params) -> dict[str, float]:
    n = len(eval_ids)
    totals = np.zeros(3)
    for start in range(0, n, eval_batch):
      rows = {k: v[start:start + eval_batch] for k, v in eval_rows.items()}
      short = eval_batch - len(rows["input_ids"])
      if short:  # pad with weightless rows: one compiled shape
        rows = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
      totals += np.asarray(jax.device_get(eval_sums(params, rows)), np.float64)
    loss_sum, correct, count = totals
    return {"mlm_accuracy": correct / max(count, 1), "mlm_loss": loss_sum / max(count, 1),
            "unigram_accuracy": unigram}

  return Task(TASK_NAME, init, loss_fn, train_source, evaluate, has_aux=True, prepare_batch=prepare_batch)
