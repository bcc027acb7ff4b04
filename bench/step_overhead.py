"""DP step / non-private step, same model and batch, jitted: the cost of exact per-example clipping.

For each workload: the non-private ``jax.value_and_grad`` of the mean loss,
then ``dpmega.private_value_and_grad`` with ``clipping="auto"`` (the default;
``"ghost"`` is the same since session 16) and ``"vmap"``; median wall time over ``--reps`` calls, the ratio
to the non-private step, the compiled temp memory (XLA's memory analysis: the
peak scratch one call needs besides its inputs and outputs), and which
parameters took which path.

Targets (issue 10, on the 2-core CPU): MLP <= 1.3x, tiny BERT MLM <= 2x,
DeepFM with a 10^6-row table <= 1.5x.

With ``--optimizer``, also a whole training step on each side (gradient +
``optax.adam`` update, params and state donated), the ratio taken against the
non-private training step. ``--batch`` overrides the workload's batch size
(repeat it for a sweep): the Gaussian draw is a fixed cost per step, so the
ratio falls as the batch grows.

Usage:
  python bench/step_overhead.py                 # all workloads
  python bench/step_overhead.py --only mlp --reps 20
  python bench/step_overhead.py --only deepfm --modes auto --optimizer --batch 1024 --batch 16384
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import dpmega
from dpmega.clipping import ghost

import timing  # bench/timing.py (this directory)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(512)(x))
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(10)(x)


class Block(nn.Module):
  dim: int
  heads: int

  @nn.compact
  def __call__(self, h, mask):
    a = nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
    h = nn.LayerNorm()(h + a)
    f = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(h)))
    return nn.LayerNorm()(h + f)


class TinyBert(nn.Module):
  """BERT-tiny-like MLM: 2 layers, d=128, 2 heads, tied output embedding."""

  vocab: int = 8192
  seq: int = 128
  dim: int = 128
  heads: int = 2
  layers: int = 2

  @nn.compact
  def __call__(self, ids, attn, positions):
    embed = nn.Embed(self.vocab, self.dim, name="tok")
    pos = nn.Embed(self.seq, self.dim, name="pos")
    h = nn.LayerNorm()(embed(ids) + pos(jnp.arange(self.seq)))
    mask = nn.make_attention_mask(attn, attn)
    for _ in range(self.layers):
      h = Block(self.dim, self.heads)(h, mask)
    h = h[positions]  # the masked positions only, as BERT does
    h = nn.LayerNorm()(nn.gelu(nn.Dense(self.dim)(h)))
    return embed.attend(h)


class DeepFM(nn.Module):
  """DeepFM over 26 categorical fields hashed into one shared 10^6 x 16 table."""

  rows: int = 1_000_000
  dim: int = 16
  fields: int = 26

  @nn.compact
  def __call__(self, ids):
    table = nn.Embed(self.rows, self.dim, name="table")
    wide = nn.Embed(self.rows, 1, name="wide")
    e = table(ids)  # [fields, dim]
    fm = 0.5 * (jnp.sum(jnp.sum(e, 0) ** 2) - jnp.sum(e ** 2))
    deep = nn.Dense(1)(nn.relu(nn.Dense(200)(nn.relu(nn.Dense(400)(e.reshape(-1))))))[0]
    return fm + jnp.sum(wide(ids)) + deep


def _xent(logits, label):
  return -jax.nn.log_softmax(logits)[label]


def workload(name, key, b=None):
  """(per-example loss, params, batch) for a named workload; ``b`` overrides its batch size."""
  k1, k2, k3 = jax.random.split(key, 3)
  if name == "mlp":
    m, b = MLP(), b or 256
    batch = {"x": jax.random.normal(k1, (b, 784)), "y": jax.random.randint(k2, (b,), 0, 10)}
    loss = lambda p, ex: _xent(m.apply(p, ex["x"]), ex["y"])
    return loss, m.init(k3, batch["x"][0]), batch
  if name == "bert":
    m, b, npred = TinyBert(), b or 32, 20
    ids = jax.random.randint(k1, (b, m.seq), 0, m.vocab)
    batch = {"ids": ids, "attn": jnp.ones((b, m.seq), jnp.int32),
             "pos": jax.random.randint(k2, (b, npred), 0, m.seq),
             "labels": jax.random.randint(k3, (b, npred), 0, m.vocab)}

    def loss(p, ex):
      logits = m.apply(p, ex["ids"], ex["attn"], ex["pos"])
      return jnp.mean(jax.vmap(_xent)(logits, ex["labels"]))
    return loss, m.init(k3, ids[0], batch["attn"][0], batch["pos"][0]), batch
  if name == "deepfm":
    m, b = DeepFM(), b or 1024
    # Zipf-like ids: most lookups hit a few hot rows, as in CTR data.
    u = jax.random.uniform(k1, (b, m.fields))
    ids = jnp.minimum((m.rows ** u).astype(jnp.int32) - 1, m.rows - 1)
    batch = {"ids": ids, "y": jax.random.bernoulli(k2, 0.25, (b,)).astype(jnp.float32)}

    def loss(p, ex):
      z = m.apply(p, ex["ids"])
      return jnp.maximum(z, 0) - z * ex["y"] + jnp.log1p(jnp.exp(-jnp.abs(z)))
    return loss, m.init(k3, ids[0]), batch
  if name in ("bert_tiny", "bert_small"):
    # dpmega.models.bert as trained by dpmega (configs/bert_tiny_mlm.py for
    # tiny; BERT-small, Turc et al. 2019, at BERT's vocabulary and length 128).
    from dpmega.models import bert as bert_lib  # pylint: disable=import-outside-toplevel
    size, vocab, seq, npred, b0 = (("tiny", 512, 32, 5, 256) if name == "bert_tiny" else
                                   ("small", 30522, 128, 20, 8))
    b = b or b0
    m = bert_lib.BertMLM(bert_lib.BertConfig.preset(size, vocab_size=vocab, max_len=seq))
    ids = jax.random.randint(k1, (b, seq), 5, vocab)
    batch = {"input_ids": ids, "mlm_positions": jax.random.randint(k2, (b, npred), 1, seq),
             "mlm_labels": jax.random.randint(k3, (b, npred), 5, vocab), "mlm_weights": jnp.ones((b, npred))}
    loss = lambda p, ex: bert_lib.mlm_loss(m, p, ex)[0]
    return loss, bert_lib.init_params(m, k3, seq_len=seq, max_predictions=npred), batch
  raise ValueError(f"unknown workload {name!r}")


def _train_step(grad_fn, opt):
  """(params, opt_state, batch, key) -> (params, opt_state): one jitted step, params and state donated."""
  def step(p, s, x, k):
    g = grad_fn(p, x, k)[1]
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step, donate_argnums=(0, 1))


def run(name, reps, modes, microbatch, batch_size=None, optimizer=False):
  loss, params, batch = workload(name, jax.random.key(0), batch_size)
  b = jax.tree_util.tree_leaves(batch)[0].shape[0]
  nparams = sum(x.size for x in jax.tree_util.tree_leaves(params))
  plan = ghost.plan_layers(loss, params, jax.tree_util.tree_map(lambda x: x[0], batch))
  paths = collections.Counter()
  for i in plan.names:
    paths["ghost/" + plan.methods[i].value if i in plan.ghost else ("vmap" if i in plan.fallback else "unused")] += 1
  print(f"\n== {name}: batch {b}, {nparams:,} params; leaves by path: {dict(paths)}")
  print("   " + plan.describe().replace("\n", "\n   "))

  nonpriv = jax.jit(jax.value_and_grad(lambda p, x, k: jnp.mean(jax.vmap(loss, (None, 0))(p, x))))
  args = (params, batch, jax.random.key(1))
  cands = {"non-private": nonpriv}
  for mode, mb in [(m, None) for m in modes] + ([("vmap", microbatch)] if microbatch else []):
    f = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=b,
                                      clipping=mode, microbatch_size=mb)
    cands[f"dp {mode}" + (f" (micro-batch {mb})" if mb else "")] = jax.jit(lambda p, x, k, f=f: f(p, x, k))
  # The clipped sum alone (no noise): separates clipping cost from the Gaussian draw on every parameter.
  clip_only = jax.jit(lambda p, x, k: dpmega.clipped_grad_sum(loss, p, x, clip_norm=1.0, clipping="auto")[0])
  cands["clip only (auto, no noise)"] = clip_only
  noise_only = jax.jit(lambda p, x, k: dpmega.privatize(p, k, noise_multiplier=1.0, clip_norm=1.0,
                                                         expected_batch_size=b))
  cands["noise only (privatize)"] = noise_only
  opt = optax.adam(1e-3)
  train = {}
  if optimizer:
    dp = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=b)
    train = {"non-private + adam": _train_step(nonpriv, opt),
             "dp auto + adam": _train_step(dp, opt)}
  mems, fast, slow = {}, {}, {}
  for label, fn in train.items():
    # Each call donates its params and state; hand it fresh copies (copying is outside the timing).
    state = {"p": jax.tree_util.tree_map(jnp.copy, params)}
    state["s"] = opt.init(state["p"])

    def call(p, x, k, fn=fn, state=state):
      state["p"], state["s"] = fn(state["p"], state["s"], x, k)
      return state["p"]
    mems[label] = timing.temp_mib(fn, (state["p"], state["s"], batch, args[2]))
    jax.block_until_ready(call(*args))
    fast[label] = call
  for label, fn in cands.items():
    mems[label] = timing.temp_mib(fn, args)
    if "vmap" in label and mems[label] > 4096:
      print(f"   {label:26s} not run: needs {mems[label] / 1024:.1f} GiB temp (out of memory here)")
      continue
    jax.block_until_ready(fn(*args))  # compile + warm up
    (slow if "vmap" in label else fast)[label] = fn
  # Interleaved rounds so that load from other processes hits every candidate alike.
  times = collections.defaultdict(list)
  for r in range(reps):
    for label, fn in list(fast.items()) + (list(slow.items()) if r < max(1, reps // 5) else []):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[label].append(time.perf_counter() - t)
  out = {}
  for label in times:
    base = statistics.median(times["non-private + adam" if "adam" in label else "non-private"])
    t = statistics.median(times[label])
    out[label] = (t, mems[label])
    print(f"   {label:26s} {t * 1e3:9.1f} ms {t / base:7.2f}x   temp {mems[label]:8.1f} MiB  (n={len(times[label])})")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", choices=["mlp", "bert", "deepfm", "bert_tiny", "bert_small"], action="append")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--modes", default="auto,vmap")  # "ghost" is "auto" (session 16)
  parser.add_argument("--batch", type=int, action="append", help="batch size(s) instead of the workload's")
  parser.add_argument("--optimizer", action="store_true", help="also time whole steps with an adam update")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  # DeepFM under vmap needs b x 10^6 x 17 floats at once; also run it micro-batched.
  micro = {"mlp": None, "bert": None, "deepfm": 8, "bert_tiny": None, "bert_small": None}
  for name in args.only or ["mlp", "bert", "deepfm"]:
    for b in args.batch or [None]:
      run(name, args.reps, args.modes.split(","), micro[name] if "vmap" in args.modes else None, b, args.optimizer)

if __name__ == "__main__":
  main()
