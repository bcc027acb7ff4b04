"""Small models (and per-example losses) shared by the clipping tests.

Defined here rather than taken from ``dpmega.models`` so the clipping tests
only depend on the clipping code.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from dpmega import clipping
from dpmega.clipping import ghost


class MLP(nn.Module):
  features: tuple[int, ...] = (16, 16, 3)

  @nn.compact
  def __call__(self, x):
    for f in self.features[:-1]:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.features[-1])(x)


class EncoderMLM(nn.Module):
  """Token + position embeddings, one post-LN encoder block, tied MLM head."""

  vocab: int = 23
  seq: int = 6
  dim: int = 8
  heads: int = 2

  @nn.compact
  def __call__(self, ids, attn_mask):
    embed = nn.Embed(self.vocab, self.dim, name="tok")
    pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.dim))
    h = embed(ids) + pos
    h = nn.LayerNorm()(h)
    mask = nn.make_attention_mask(attn_mask, attn_mask)
    a = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(h, h, mask=mask)
    h = nn.LayerNorm()(h + a)
    f = nn.DenseGeneral((2, self.dim // 2))(h)  # multi-dim output
    f = nn.DenseGeneral(self.dim, axis=(-2, -1))(nn.gelu(f))  # multi-dim contraction
    h = nn.LayerNorm()(h + f)
    return embed.attend(h)  # tied output embedding: a second, transposed use of "tok"


def encoder_loss(model):
  def loss(params, ex):
    logits = model.apply(params, ex["ids"], ex["attn"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, ex["labels"][:, None], axis=1)[:, 0]
    w = ex["mlm"].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
  return loss


def encoder_batch(key, b, model):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  ids = jax.random.randint(k1, (b, model.seq), 0, model.vocab)
  ids = ids.at[:, 1].set(ids[:, 0])  # duplicate token ids inside each example
  lengths = jax.random.randint(k2, (b,), 2, model.seq + 1)
  attn = (jnp.arange(model.seq)[None] < lengths[:, None]).astype(jnp.int32)
  mlm = (jax.random.uniform(k3, (b, model.seq)) < 0.5) & (attn > 0)
  mlm = mlm.at[:, 0].set(True)
  labels = jax.random.randint(k4, (b, model.seq), 0, model.vocab)
  return {"ids": ids, "attn": attn, "mlm": mlm, "labels": labels}


class TiedHead(nn.Module):
  """Token embeddings and the tied output projection at a few predicted positions (BERT's MLM head, no encoder)."""

  vocab: int = 4096
  dim: int = 32
  layer_norm: bool = True

  @nn.compact
  def __call__(self, ids, positions):
    embed = nn.Embed(self.vocab, self.dim, name="tok")
    h = nn.LayerNorm()(embed(ids)) if self.layer_norm else embed(ids)
    return embed.attend(h[positions])  # [predictions, vocab]


def tied_head_loss(model):
  def loss(params, ex):
    logp = jax.nn.log_softmax(model.apply(params, ex["ids"], ex["positions"]))
    return -jnp.mean(jnp.take_along_axis(logp, ex["labels"][:, None], axis=1))
  return loss


def tied_head_distill_loss(model):
  """Distillation onto a teacher's distribution (``ex["teacher"]``, ``[predictions, vocab]`` logits): the output
  gradients ``softmax - teacher`` are dense rows that overlap, unlike a softmax against one-hot labels."""
  def loss(params, ex):
    logp = jax.nn.log_softmax(model.apply(params, ex["ids"], ex["positions"]))
    return -jnp.mean(jnp.sum(jax.nn.softmax(ex["teacher"]) * logp, axis=-1))
  return loss


def tied_head_batch(key, b, model, seq, predictions):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"ids": jax.random.randint(k1, (b, seq), 0, model.vocab),
          "positions": jax.random.randint(k2, (b, predictions), 0, seq),
          "labels": jax.random.randint(k3, (b, predictions), 0, model.vocab)}


class NNXEncoder(nnx.Module):
  """The same kind of block in NNX."""

  def __init__(self, vocab, dim, heads, *, rngs):
    self.tok = nnx.Embed(vocab, dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, qkv_features=dim, decode=False, rngs=rngs)
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.gen = nnx.LinearGeneral(2 * dim, (2, dim), rngs=rngs)
    self.out = nnx.Linear(2 * dim, vocab, rngs=rngs)

  def __call__(self, ids, attn_mask):
    h = self.tok(ids)
    mask = nnx.make_attention_mask(attn_mask, attn_mask)
    h = self.ln1(h + self.attn(h, mask=mask))
    f = jax.nn.relu(self.up(h))
    h = self.ln2(h + jnp.sum(self.gen(f), axis=-2))
    return self.out(jnp.concatenate([h, h], axis=-1))


def nnx_loss(graphdef):
  def loss(state, ex):
    model = nnx.merge(graphdef, state)
    logits = model(ex["ids"], ex["attn"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, ex["labels"][:, None], axis=1)[:, 0]
    w = ex["mlm"].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
  return loss


class DeepFM(nn.Module):
  """DeepFM-like CTR model: per-field tables (two fields share one), a multi-hot bag.

  Field 2 reuses field 0's table (a shared table); the bag uses ``jnp.take``
  with ``mode="fill"`` so the padding id ``-1 -> V`` is out of range and
  dropped (no gradient), and a first-order (``wide``) table of width 1.
  """

  vocab: tuple[int, ...] = (11, 7, 9)
  dim: int = 4

  @nn.compact
  def __call__(self, fields, bag):
    t0 = self.param("table0", nn.initializers.normal(0.1), (self.vocab[0], self.dim))
    t1 = self.param("table1", nn.initializers.normal(0.1), (self.vocab[1], self.dim))
    tb = self.param("table_bag", nn.initializers.normal(0.1), (self.vocab[2], self.dim))
    wide = self.param("wide", nn.initializers.normal(0.1), (self.vocab[0], 1))
    e = [t0[fields[0]], t1[fields[1]], t0[fields[2]]]
    bag_ids = jnp.where(bag < 0, self.vocab[2], bag)
    rows = jnp.take(tb, bag_ids, axis=0, mode="fill", fill_value=0.0)
    e.append(jnp.sum(rows, axis=0))
    e = jnp.stack(e)  # [fields, dim]
    fm = 0.5 * (jnp.sum(jnp.sum(e, 0) ** 2) - jnp.sum(e ** 2))
    first = jnp.sum(wide[fields[0]]) + jnp.sum(wide[fields[2]])
    deep = nn.Dense(1)(nn.relu(nn.Dense(8)(e.reshape(-1))))[0]
    return fm + first + deep


def ctr_loss(model):
  def loss(params, ex):
    logit = model.apply(params, ex["fields"], ex["bag"])
    return optax_sigmoid_bce(logit, ex["label"])
  return loss


def optax_sigmoid_bce(logit, label):
  return jnp.maximum(logit, 0) - logit * label + jnp.log1p(jnp.exp(-jnp.abs(logit)))


def ctr_batch(key, b, model, bag_len=5):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  f0 = jax.random.randint(k1, (b,), 0, model.vocab[0])
  f1 = jax.random.randint(k2, (b,), 0, model.vocab[1])
  f2 = jnp.where(jnp.arange(b) % 2 == 0, f0, (f0 + 1) % model.vocab[0])  # shared table, same id as f0 half the time
  bag = jax.random.randint(k3, (b, bag_len), 0, model.vocab[2])
  bag = bag.at[:, 1].set(bag[:, 0])  # duplicate ids in a bag
  bag = bag.at[:, -1].set(-1)  # padding id
  label = jax.random.bernoulli(k4, 0.3, (b,)).astype(jnp.float32)
  return {"fields": jnp.stack([f0, f1, f2], axis=1), "bag": bag, "label": label}


@contextlib.contextmanager
def gram_mode():
  """``clipping="gram"`` for the tests of the Gram bound: ``ghost.clipped_sum_gram``, every recognised layer clipped
  by its bound and nothing scanned. Not a public mode (its sums fall below vmap's by the bound's excess on benign
  inputs); registered here so that the bound is tested through the public ``private_value_and_grad``."""
  clipping._MODES["gram"] = ghost.clipped_sum_gram
  try:
    yield
  finally:
    del clipping._MODES["gram"]
