"""BERT encoder with a masked-LM head (Flax Linen), its per-example loss and its task.

Built only from stock Linen layers (``nn.Embed``, ``nn.Dense``,
``nn.MultiHeadDotProductAttention``, ``nn.LayerNorm``) so that the default
clipping mode (``"auto"``, :mod:`dpmega.clipping.ghost`) recognises them: every kernel
gets ghost norms; the input word embedding of an untied model is clipped from
its looked-up rows (sparse, :mod:`dpmega.clipping.rows`), a tied one over both
of its uses (lookup and output projection); biases, LayerNorm and the tied
head's output bias (a plain ``param``) get per-example gradients by ``vmap``.

Post-LayerNorm Transformer as in Devlin et al. 2019 (arXiv 1810.04805),
trained on the masked-LM loss only (the metric the DP pretraining of Anil et
al. 2021, arXiv 2108.01624, reports): no next-sentence head, no segment
embeddings.

Privacy: :func:`mlm_loss` is a PER-EXAMPLE loss (one packed row, no batch
axis): the mean cross-entropy over that row's masked positions. Nothing in the
forward pass mixes examples (no batch norm, attention is within a row), which
is what per-example clipping requires. There is no dropout: a per-example loss
``(params, example)`` has no per-step randomness to draw it from.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class Size(str, enum.Enum):
  """Preset sizes: ``tiny`` runs in CI; ``base`` and ``large`` are BERT's."""

  TINY = "tiny"
  MINI = "mini"
  SMALL = "small"
  BASE = "base"
  LARGE = "large"


# (layers, hidden, heads, intermediate). mini/small are compact BERTs of Turc
# et al. 2019 (arXiv 1908.08962); `tiny` is smaller than theirs (2 x 128) so
# that private training runs in CI on 2 CPU cores; base and large are Devlin
# et al. 2019, section 3 (BERT-Large: 24 layers, 1024 hidden, 16 heads).
_PRESETS = {
    Size.TINY: (2, 32, 2, 128),
    Size.MINI: (4, 256, 4, 1024),
    Size.SMALL: (4, 512, 8, 2048),
    Size.BASE: (12, 768, 12, 3072),
    Size.LARGE: (24, 1024, 16, 4096),
}


class DType(str, enum.Enum):
  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and numerics of a BERT masked-LM model.

  Attributes:
    vocab_size: number of token ids (BERT-uncased: 30522).
    max_len: longest sequence (positions embedded).
    num_layers, hidden_size, num_heads, intermediate_size: the encoder.
    tie_embeddings: output projection = input word embedding (transposed)
      plus a bias, as BERT; ``False``: a separate ``nn.Dense``.
    dtype: compute dtype. Parameters are always float32; with ``bfloat16``
      matmuls run in bf16, LayerNorm statistics and the loss in float32, and
      the clipped gradient sums are accumulated in float32 by
      :mod:`dpmega.clipping`.
    pad_id: the [PAD] id, never attended to.
  """

  vocab_size: int
  max_len: int = 128
  num_layers: int = 2
  hidden_size: int = 64
  num_heads: int = 2
  intermediate_size: int = 256
  tie_embeddings: bool = True
  dtype: DType = DType.FLOAT32
  pad_id: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "max_len", "num_layers", "hidden_size", "num_heads", "intermediate_size"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={v!r}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size must be a multiple of num_heads={self.num_heads}, got hidden_size={self.hidden_size}.")
    if not 0 <= self.pad_id < self.vocab_size:
      raise ValueError(f"pad_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_id=}.")
    object.__setattr__(self, "dtype", DType(self.dtype))

  @classmethod
  def preset(cls, size: str | Size, *, vocab_size: int, **overrides) -> "BertConfig":
    """A preset size with ``vocab_size`` and any field overridden.

    Raises:
      ValueError: naming ``size`` and the allowed presets.
    """
    try:
      size = Size(size)
    except ValueError:
      raise ValueError(f"size must be one of {[s.value for s in Size]}, got {size=!r}.") from None
    layers, hidden, heads, inter = _PRESETS[size]
    fields = dict(num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=inter)
    fields.update(overrides)
    return cls(vocab_size=vocab_size, **fields)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.bfloat16 if self.dtype == DType.BFLOAT16 else jnp.float32


def _init(stddev: float = 0.02):
  return nn.initializers.truncated_normal(stddev)


class TransformerLayer(nn.Module):
  """Post-LN block: x + attention -> LN -> x + MLP -> LN."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    c = self.config
    dt = c.compute_dtype
    h = nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, dtype=dt, kernel_init=_init(), name="attention")(x, x, mask=attention_mask)
    x = nn.LayerNorm(epsilon=1e-12, dtype=jnp.float32, name="attention_ln")(x + h)
    h = nn.Dense(c.intermediate_size, dtype=dt, kernel_init=_init(), name="intermediate")(x)
    h = nn.gelu(h, approximate=False)
    h = nn.Dense(c.hidden_size, dtype=dt, kernel_init=_init(), name="output")(h)
    return nn.LayerNorm(epsilon=1e-12, dtype=jnp.float32, name="output_ln")(x + h)


class BertMLM(nn.Module):
  """BERT encoder + masked-LM head.

  ``__call__(input_ids [..., T], mlm_positions [..., P]) -> logits [..., P, V]``
  (float32). Works with or without leading batch axes: the per-example loss
  calls it on one row ``[T]``.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, mlm_positions: jax.Array) -> jax.Array:
    c = self.config
    dt = c.compute_dtype
    t = input_ids.shape[-1]
    word = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_init(), dtype=dt, name="word_embeddings")
    x = word(input_ids)
    x = x + nn.Embed(c.max_len, c.hidden_size, embedding_init=_init(), dtype=dt,
                     name="position_embeddings")(jnp.arange(t))
    x = nn.LayerNorm(epsilon=1e-12, dtype=jnp.float32, name="embeddings_ln")(x)
    valid = input_ids != c.pad_id
    attention_mask = nn.make_attention_mask(valid, valid)
    for i in range(c.num_layers):
      x = TransformerLayer(c, name=f"layer_{i}")(x.astype(dt), attention_mask)
    # Only the predicted positions go through the head: P of T rows of the
    # V-wide output layer, its largest matmul.
    h = jnp.take_along_axis(x, mlm_positions[..., :, None], axis=-2)
    h = nn.Dense(c.hidden_size, dtype=dt, kernel_init=_init(), name="mlm_transform")(h)
    h = nn.gelu(h, approximate=False)
    h = nn.LayerNorm(epsilon=1e-12, dtype=jnp.float32, name="mlm_ln")(h)
    if c.tie_embeddings:
      logits = word.attend(h.astype(dt)).astype(jnp.float32)
      logits = logits + self.param("mlm_bias", nn.initializers.zeros_init(), (c.vocab_size,), jnp.float32)
    else:
      logits = nn.Dense(c.vocab_size, dtype=dt, kernel_init=_init(), name="mlm_output")(h).astype(jnp.float32)
    return logits


def init_params(model: BertMLM, key: jax.Array, *, seq_len: int, max_predictions: int) -> PyTree:
  """Float32 parameters of ``model`` for rows of ``seq_len`` with ``max_predictions`` slots."""
  ids = jnp.zeros((seq_len,), jnp.int32)
  pos = jnp.zeros((max_predictions,), jnp.int32)
  return model.init(key, ids, pos)["params"]


def mlm_loss(model: BertMLM, params: PyTree, example: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
  """Per-example masked-LM loss: mean cross-entropy over the row's used prediction slots.

  Args:
    model: the :class:`BertMLM`.
    params: its parameters.
    example: ONE row: ``input_ids [T]`` (already masked), ``mlm_positions [P]``,
      ``mlm_labels [P]``, ``mlm_weights [P]`` (see
      :func:`dpmega.data.text.mask_tokens`).

  Returns:
    ``(loss, {"correct": number of used slots whose argmax is the label,
    "count": number of used slots})``; a row with no used slot has loss 0 and
    a zero gradient.
  """
  logits = model.apply({"params": params}, example["input_ids"], example["mlm_positions"])
  labels = example["mlm_labels"]
  w = example["mlm_weights"].astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  count = jnp.sum(w)
  loss = jnp.sum(w * xent) / jnp.maximum(count, 1.0)
  correct = jnp.sum(w * (jnp.argmax(logits, axis=-1) == labels))
  return loss, {"correct": correct, "count": count}


def param_count(params: PyTree) -> int:
  return int(sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------- the trainer's task

TASK_NAME = "bert_mlm"


class TextSourceKind(str, enum.Enum):
  """Where the task's text comes from."""

  STDLIB = "stdlib"  # docstrings of the running Python (public, offline; demo and tests)
  TEXT = "text"  # plain text files: documents separated by blank lines
  TFDS = "tfds"  # a TFDS text dataset read through tfds.data_source


def default_task_config():
  """``config.task`` of the ``bert_mlm`` task, every field with its default.

  Model: ``size`` (a :class:`Size`) with optional overrides (0 = the preset's):
  ``num_layers``, ``hidden_size``, ``num_heads``, ``intermediate_size``;
  ``tie_embeddings``; ``dtype`` (``"float32"`` or ``"bfloat16"``).
  Rows: ``seq_len``, ``mask_rate``, ``max_predictions`` (0: ``ceil(mask_rate *
  seq_len)``, BERT's 20 at 128).
  Data: ``source`` (a :class:`TextSourceKind`); ``train_files`` /
  ``eval_files`` for ``text``; ``tfds_name``, ``tfds_train_split``,
  ``tfds_eval_split``, ``tfds_feature``, ``tfds_data_dir`` for ``tfds``;
  ``vocab_path`` (a BERT ``vocab.txt``; empty: train one of ``vocab_size`` on
  the train text -- see the warning of :func:`dpmega.data.text.train_wordpiece`;
  required for ``tfds``), ``lowercase``; ``cache_dir`` (empty:
  ``$DPMEGA_CACHE_DIR`` or ``~/.cache/dpmega``); ``max_train_rows`` /
  ``max_eval_rows`` (0: all); ``eval_seed`` (the fixed masking of the eval
  rows); ``eval_batch_size``.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

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
  })


def _task_int(cfg, name: str, lo: int, hi: int) -> int:
  value = cfg[name]
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
    raise ValueError(f"task.{name} must be an int in [{lo}, {hi}], got {value!r}.")
  return int(value)


def _task_choice(cfg, name: str, enum_cls):
  try:
    return enum_cls(cfg[name])
  except ValueError:
    raise ValueError(f"task.{name} must be one of {[e.value for e in enum_cls]}, got {cfg[name]!r}.") from None


def masking_config(task_cfg):
  """The :class:`dpmega.data.text.MaskingConfig` of ``config.task``."""
  from dpmega.data import text  # pylint: disable=g-import-not-at-top

  seq_len = _task_int(task_cfg, "seq_len", 8, 1 << 16)
  rate = task_cfg.mask_rate
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 0.5:
    raise ValueError(f"task.mask_rate must be a number in (0, 0.5], got {rate!r}.")
  p = _task_int(task_cfg, "max_predictions", 0, seq_len) or math.ceil(rate * seq_len)
  return text.MaskingConfig(mask_rate=float(rate), max_predictions=p)


def model_config(task_cfg, *, vocab_size: int, pad_id: int = 0) -> BertConfig:
  """The :class:`BertConfig` of ``config.task`` for a vocabulary of ``vocab_size``."""
  size = _task_choice(task_cfg, "size", Size)
  overrides = {k: _task_int(task_cfg, k, 0, 1 << 20)
               for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")}
  overrides = {k: v for k, v in overrides.items() if v}
  if not isinstance(task_cfg.tie_embeddings, bool):
    raise ValueError(f"task.tie_embeddings must be True or False, got {task_cfg.tie_embeddings!r}.")
  return BertConfig.preset(
      size, vocab_size=vocab_size, max_len=_task_int(task_cfg, "seq_len", 8, 1 << 16),
      tie_embeddings=task_cfg.tie_embeddings, dtype=_task_choice(task_cfg, "dtype", DType), pad_id=pad_id,
      **overrides)


def abstract_params(task_cfg, *, vocab_size: int) -> PyTree:
  """Shapes and dtypes of the parameters (``jax.ShapeDtypeStruct``), allocating nothing."""
  model = BertMLM(model_config(task_cfg, vocab_size=vocab_size))
  masking = masking_config(task_cfg)
  return jax.eval_shape(
      lambda k: init_params(model, k, seq_len=task_cfg.seq_len, max_predictions=masking.max_predictions),
      jax.random.key(0))


def _tokenizer_and_sources(task_cfg):
  """(tokenizer, train ArraySource, eval ArraySource) of ``config.task``, packing once into the cache."""
  from dpmega.data import text  # pylint: disable=g-import-not-at-top

  kind = _task_choice(task_cfg, "source", TextSourceKind)
  seq_len = _task_int(task_cfg, "seq_len", 8, 1 << 16)
  cache = pathlib.Path(task_cfg.cache_dir) if task_cfg.cache_dir else text.default_cache_dir()
  max_train = _task_int(task_cfg, "max_train_rows", 0, 1 << 40) or None
  max_eval = _task_int(task_cfg, "max_eval_rows", 0, 1 << 40) or None
  vocab_size = _task_int(task_cfg, "vocab_size", len(text.SPECIAL_TOKENS) + 1, 1 << 22)
  vocab_path = task_cfg.vocab_path
  if kind == TextSourceKind.STDLIB:
    corpus = text.prepare_stdlib_corpus(cache / "text", vocab_size=vocab_size)
    train_docs = lambda: text.read_documents([corpus.train])
    eval_docs = lambda: text.read_documents([corpus.eval])
    vocab_path = vocab_path or corpus.vocab
    identity = ("stdlib", str(corpus.train))
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
      vocab_path = text.train_wordpiece(train_files, cache / "text" / "vocab" / text.cache_name(stats, vocab_size),
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
  tokenizer = text.WordPiece(vocab_path, lowercase=task_cfg.lowercase)
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


def build_task(config):
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
  from dpmega import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from dpmega.data import text  # pylint: disable=g-import-not-at-top

  task_cfg = config.task
  masking = masking_config(task_cfg)
  tokenizer, train_source, eval_source = _tokenizer_and_sources(task_cfg)
  special, vocab_size = tokenizer.special, tokenizer.vocab_size
  model = BertMLM(model_config(task_cfg, vocab_size=vocab_size, pad_id=special.pad))
  seq_len = task_cfg.seq_len
  eval_batch = _task_int(task_cfg, "eval_batch_size", 1, 1 << 20)

  def init(key):
    return init_params(model, key, seq_len=seq_len, max_predictions=masking.max_predictions)

  loss_fn = functools.partial(mlm_loss, model)

  def prepare_batch(batch, key):
    return text.mask_tokens(batch["input_ids"], key, config=masking, special=special, vocab_size=vocab_size)

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

  return tasks_lib.Task(TASK_NAME, init, loss_fn, train_source, evaluate, has_aux=True, prepare_batch=prepare_batch)
