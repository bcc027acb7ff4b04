"""BERT encoder with a masked-LM head (Flax Linen) and its per-example loss.

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

The ``bert_mlm`` task (text, masking, ``config.task`` fields) is :mod:`dpmega.tasks.bert`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
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
      :func:`dpmega.data.masking.mask_tokens`).

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
