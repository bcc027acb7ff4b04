"""The three workloads in torch.nn, mirroring ``models_flax`` shape for shape.

Only layers Opacus knows how to differentiate per example hold parameters
(``Linear``, ``Embedding``, ``LayerNorm``); attention is written out with
einsum, and position embeddings are looked up with a batch axis so Opacus'
per-sample hooks see one row of positions per example.

Each criterion has a ``reduction`` attribute ("mean" | "sum" | "none") as
Opacus' ghost clipping wrapper sets it to "none" to get per-example losses.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from config import Workload


class MLP(nn.Module):

  def __init__(self, in_dim, hidden, num_classes):
    super().__init__()
    dims = (in_dim, *hidden)
    self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
    self.out = nn.Linear(dims[-1], num_classes)

  def forward(self, x):
    for layer in self.hidden:
      x = F.relu(layer(x))
    return self.out(x)


class Block(nn.Module):

  def __init__(self, d_model, num_heads, d_ff):
    super().__init__()
    self.num_heads = num_heads
    self.ln1 = nn.LayerNorm(d_model, eps=1e-5)
    self.qkv = nn.Linear(d_model, 3 * d_model)
    self.proj = nn.Linear(d_model, d_model)
    self.ln2 = nn.LayerNorm(d_model, eps=1e-5)
    self.ff1 = nn.Linear(d_model, d_ff)
    self.ff2 = nn.Linear(d_ff, d_model)

  def forward(self, x):
    b, t, d = x.shape
    hd = d // self.num_heads
    qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd), dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + self.proj(o)
    return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class Encoder(nn.Module):

  def __init__(self, vocab_size, seq_len, d_model, num_heads, d_ff, num_layers):
    super().__init__()
    self.tok = nn.Embedding(vocab_size, d_model)
    self.pos = nn.Embedding(seq_len, d_model)
    self.blocks = nn.ModuleList(Block(d_model, num_heads, d_ff) for _ in range(num_layers))
    self.ln = nn.LayerNorm(d_model, eps=1e-5)
    self.out = nn.Linear(d_model, vocab_size)

  def forward(self, tokens):
    b, t = tokens.shape
    # repeat, not expand: Opacus' ghost norm sampler for Embedding calls .view on the ids.
    pos = torch.arange(t, device=tokens.device).repeat(b, 1)
    x = self.tok(tokens) + self.pos(pos)
    for block in self.blocks:
      x = block(x)
    return self.out(self.ln(x))


class DeepFM(nn.Module):

  def __init__(self, table_rows, embed_dim, num_dense, deep_hidden):
    super().__init__()
    self.emb = nn.ModuleList(nn.Embedding(r, embed_dim) for r in table_rows)
    self.first = nn.ModuleList(nn.Embedding(r, 1) for r in table_rows)
    self.dense_emb = nn.Linear(num_dense, embed_dim)
    self.dense_first = nn.Linear(num_dense, 1)
    dims = ((len(table_rows) + 1) * embed_dim, *deep_hidden)
    self.deep = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
    self.deep_out = nn.Linear(dims[-1], 1)
    for table in (*self.emb, *self.first):
      nn.init.normal_(table.weight, std=0.01)

  def forward(self, ids, dense):
    fields = [e(ids[:, k]) for k, e in enumerate(self.emb)] + [self.dense_emb(dense)]
    first = [e(ids[:, k])[:, 0] for k, e in enumerate(self.first)] + [self.dense_first(dense)[:, 0]]
    f = torch.stack(fields, dim=1)
    fm = 0.5 * (f.sum(1).square() - f.square().sum(1)).sum(-1)
    h = f.reshape(f.shape[0], -1)
    for layer in self.deep:
      h = F.relu(layer(h))
    return sum(first) + fm + self.deep_out(h)[:, 0]


class MaskedLMLoss(nn.Module):
  """Per example: mean cross-entropy over its masked positions."""

  def __init__(self, reduction="mean"):
    super().__init__()
    self.reduction = reduction

  def forward(self, logits, labels, weights):
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(weights)
    per_example = (ce * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
    if self.reduction == "none":
      return per_example
    return per_example.sum() if self.reduction == "sum" else per_example.mean()


def build(w: Workload):
  """``(model, criterion, inputs(batch) -> tuple, targets(batch) -> tuple)``."""
  if w.kind == "mlp":
    return (MLP(w.in_dim, w.hidden, w.num_classes), nn.CrossEntropyLoss(),
            lambda b: (b["x"],), lambda b: (b["y"],))
  if w.kind == "mlm":
    return (Encoder(w.vocab_size, w.seq_len, w.d_model, w.num_heads, w.d_ff, w.num_layers),
            MaskedLMLoss(), lambda b: (b["tokens"],), lambda b: (b["labels"], b["weights"]))
  if w.kind == "ctr":
    return (DeepFM(w.table_rows, w.embed_dim, w.num_dense, w.deep_hidden), nn.BCEWithLogitsLoss(),
            lambda b: (b["ids"], b["dense"]), lambda b: (b["y"],))
  raise ValueError(f"unknown workload kind {w.kind!r}")


def to_torch(batch):
  """NumPy batch -> torch tensors (int ids as int64, as torch's lookups want)."""
  return {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
          for k, v in batch.items()}
