"""The three workloads as Flax Linen modules (used by dpmega and jax_privacy).

``per_example_loss(params, example)`` takes ONE example (no batch axis), as
dpmega wants; ``batch_loss(params, batch)`` is the mean over a batch, as
``jax.value_and_grad`` and ``jax_privacy.clipped_grad`` (``keep_batch_dim``)
want. Both call the same module, so the two libraries differentiate the same
function.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from config import Workload


class MLP(nn.Module):
  hidden: tuple[int, ...]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class Block(nn.Module):
  """Pre-LayerNorm encoder block; attention written out so torch can mirror it."""

  d_model: int
  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    hd = d // self.num_heads
    h = nn.LayerNorm(epsilon=1e-5)(x)
    qkv = nn.Dense(3 * d)(h).reshape(b, t, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + nn.Dense(d)(o)
    h = nn.LayerNorm(epsilon=1e-5)(x)
    return x + nn.Dense(d)(nn.gelu(nn.Dense(self.d_ff)(h), approximate=False))


class Encoder(nn.Module):
  vocab_size: int
  seq_len: int
  d_model: int
  num_heads: int
  d_ff: int
  num_layers: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab_size, self.d_model)(tokens)
    x = x + nn.Embed(self.seq_len, self.d_model)(jnp.arange(tokens.shape[1]))[None]
    for _ in range(self.num_layers):
      x = Block(self.d_model, self.num_heads, self.d_ff)(x)
    x = nn.LayerNorm(epsilon=1e-5)(x)
    return nn.Dense(self.vocab_size)(x)


class DeepFM(nn.Module):
  table_rows: tuple[int, ...]
  embed_dim: int
  deep_hidden: tuple[int, ...]

  @nn.compact
  def __call__(self, ids, dense):
    init = nn.initializers.normal(0.01)
    fields = [nn.Embed(r, self.embed_dim, embedding_init=init)(ids[:, k])
              for k, r in enumerate(self.table_rows)]
    first = [nn.Embed(r, 1, embedding_init=init)(ids[:, k])[:, 0]
             for k, r in enumerate(self.table_rows)]
    fields.append(nn.Dense(self.embed_dim)(dense))
    first.append(nn.Dense(1)(dense)[:, 0])
    f = jnp.stack(fields, axis=1)  # (b, F, D)
    fm = 0.5 * (jnp.square(f.sum(1)) - jnp.square(f).sum(1)).sum(-1)
    h = f.reshape(f.shape[0], -1)
    for width in self.deep_hidden:
      h = nn.relu(nn.Dense(width)(h))
    deep = nn.Dense(1)(h)[:, 0]
    return sum(first) + fm + deep


def build(w: Workload) -> tuple[nn.Module, Callable[..., Any]]:
  """The module and ``batch_losses(params, batch) -> (b,)`` per-example losses."""
  if w.kind == "mlp":
    model = MLP(w.hidden, w.num_classes)

    def losses(params, batch):
      logits = model.apply({"params": params}, batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  elif w.kind == "mlm":
    model = Encoder(w.vocab_size, w.seq_len, w.d_model, w.num_heads, w.d_ff, w.num_layers)

    def losses(params, batch):
      logits = model.apply({"params": params}, batch["tokens"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
      wts = batch["weights"]
      return (ce * wts).sum(-1) / jnp.maximum(wts.sum(-1), 1.0)
  elif w.kind == "ctr":
    model = DeepFM(w.table_rows, w.embed_dim, w.deep_hidden)

    def losses(params, batch):
      logits = model.apply({"params": params}, batch["ids"], batch["dense"])
      return optax.sigmoid_binary_cross_entropy(logits, batch["y"])
  else:
    raise ValueError(f"unknown workload kind {w.kind!r}")
  return model, losses


def init_params(w: Workload, batch: dict[str, Any], seed: int = 0, jit: bool = True):
  """Parameters; ``jit=False`` keeps Flax's creation order of the dict keys."""
  model, _ = build(w)
  one = jax.tree.map(lambda a: a[:1], batch)
  args = (one["x"],) if w.kind == "mlp" else (
      (one["tokens"],) if w.kind == "mlm" else (one["ids"], one["dense"]))
  # One compiled init: op-by-op init of the encoder takes ~20 s on a busy CPU.
  init = jax.jit(model.init) if jit else model.init
  return init(jax.random.key(seed), *args)["params"]


def loss_fns(w: Workload):
  """``(per_example_loss(params, example), batch_loss(params, batch))``."""
  _, losses = build(w)

  def per_example_loss(params, example):
    return losses(params, jax.tree.map(lambda a: a[None], example))[0]

  def batch_loss(params, batch):
    return losses(params, batch).mean()

  return per_example_loss, batch_loss
