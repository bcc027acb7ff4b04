"""A plain Flax + Optax training loop, then the same loop made private with dpmega.

The private version differs in the lines marked ``# DP``:

1. the batched loss stays as it is; ``jax.value_and_grad(loss)`` becomes
   ``dpmega.private_value_and_grad(loss, batch_argnums=...)`` (each example is
   passed as a batch of one);
2. the batches come from ``dpmega.PoissonData``: Poisson-sampled (as the
   accountant assumes), padded to one shape, each with its ``StepKey`` (the
   secret noise key, the padding mask, and the sigma and B recorded in its
   ledger), all keyed by a secret drawn from the OS CSPRNG;
3. epsilon is the ledger's: ``data.epsilon(delta)``.

The secret matters: noise that anyone can regenerate (``jax.random.key(step)``,
a seed in a config file) can be subtracted from the released model, and so can
Poisson memberships that anyone can recompute. Only the parameter
initialization and the non-private loop use a public ``seed``.

Both Flax APIs are shown: Linen (``params`` dict) and NNX (``nnx.split`` state;
for a model with BatchStat/RngState/Dropout use ``dpmega.nnx_value_and_grad``,
see tests/flax_upstream/flax_mnist_nnx_private.py).

Run: ``python examples/flax_private_loop.py [--steps 200]``.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

import dpmega


def make_data(n: int = 4096, d: int = 10, seed: int = 0):
  """A learnable 2-class problem: labels from a hidden nonlinear rule."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = ((x[:, 0] * x[:, 1] + x[:, 2] - 0.5 * x[:, 3]) > 0).astype(np.int32)
  return {"x": x, "y": y}


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(32)(x)))


class NNXMLP(nnx.Module):
  def __init__(self, d, rngs):
    self.l1 = nnx.Linear(d, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def accuracy(logits_fn, data):
  return float(np.mean(np.argmax(np.asarray(logits_fn(data["x"])), -1) == data["y"]))


def linen_model(data, seed):
  """Linen: params are a dict; the model is applied with `model.apply`."""
  model = LinenMLP()
  params = model.init(jax.random.key(seed), data["x"][:1])["params"]
  return params, lambda p, x: model.apply({"params": p}, x)


def nnx_model(data, seed):
  """NNX: `nnx.split` gives the trainable state (the rest closed over); `nnx.merge` rebuilds the model."""
  graphdef, params, rest = nnx.split(NNXMLP(data["x"].shape[1], nnx.Rngs(seed)), nnx.Param, ...)
  return params, lambda p, x: nnx.merge(graphdef, p, rest)(x)


def train(make_model, data, *, steps, batch_size, private, clip_norm=1.0, noise_multiplier=1.0, lr=0.5,
          seed=0):
  """The same Optax loop, non-private or private; the private lines are marked `# DP`.

  Returns the losses, the train accuracy and (private) the epsilon at delta = 1e-5 of the steps that ran.
  """
  params, logits = make_model(data, seed)
  opt = optax.sgd(lr, momentum=0.9)
  opt_state = opt.init(params)
  n = len(data["y"])

  def loss_fn(p, x, y):  # mean over the batch, as it is
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

  if not private:
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  else:
    grad_fn = dpmega.private_value_and_grad(  # DP: the private gradient; each example a batch of one
        loss_fn, batch_argnums=(1, 2), clip_norm=clip_norm, microbatch_size=batch_size // 2)
    # DP: Poisson batches (q = batch_size / n) padded to 2 * batch_size rows, with their secret StepKeys
    dp_data = dpmega.PoissonData(data, expected_batch_size=batch_size, noise_multiplier=noise_multiplier,
                                 batch_size=2 * batch_size)

  @jax.jit
  def apply(p, s, g):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    if private:
      idx, step = dp_data.next_step()  # DP: the step's rows and its StepKey (key, mask, sigma, B)
      loss, grads = grad_fn(params, data["x"][idx], data["y"][idx], key=step)
    else:
      idx = rng.choice(n, batch_size, replace=False)
      loss, grads = grad_fn(params, data["x"][idx], data["y"][idx])
    params, opt_state = apply(params, opt_state, grads)
    losses.append(float(loss))
  eps = dp_data.epsilon(1e-5) if private else None  # DP: epsilon of the steps that ran, from the ledger
  return losses, accuracy(lambda x: logits(params, x), data), eps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--noise_multiplier", type=float, default=1.0)
  args = parser.parse_args(argv)
  data = make_data()
  results = {}
  for api, make_model in (("linen", linen_model), ("nnx", nnx_model)):
    for private in (False, True):
      losses, acc, eps = train(make_model, data, steps=args.steps, batch_size=args.batch_size, private=private,
                               noise_multiplier=args.noise_multiplier)
      name = f"{api}/{'private' if private else 'non-private'}"
      results[name] = {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "accuracy": acc}
      print(f"{name:18s} loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}   train accuracy {acc:.3f}")
  print(f"private runs: epsilon = {eps:.2f} at delta = 1e-05 (RDP, Poisson sampling, add/remove-one neighbours)")
  results["epsilon"] = eps
  return results


if __name__ == "__main__":
  main()
