"""A plain Flax + Optax training loop, then the same loop made private with dpmega.

The private version differs in three lines (marked ``# DP``):

1. the loss is written for ONE example (vmap adds the batch axis);
2. ``jax.value_and_grad(loss)`` becomes ``dpmega.private_value_and_grad(...)``;
3. the batches come from ``dpmega.PoissonSampler`` and the gradient call takes
   the step's noise key ``dpmega.step_key(secret, step)``, both keyed by one
   secret drawn from the OS CSPRNG (``dpmega.secret_bytes()``).

The secret matters: noise that anyone can regenerate (``jax.random.key(step)``,
a seed in a config file) can be subtracted from the released model, and so can
Poisson memberships that anyone can recompute. Keep the secret like the model's
checkpoints and never log it (or a hash of it). Only the parameter
initialization and the non-private loop use a public ``seed``.

Both Flax APIs are shown: Linen (``params`` dict) and NNX (``nnx.split`` state).

Run: ``python examples/flax_private_loop.py [--steps 200]``.
The epsilon of the private run is printed with dp-accounting's RDP accountant
(batches here are drawn by Poisson sampling with rate q = B / N, as the
accounting assumes).
"""

from __future__ import annotations

import argparse

import dp_accounting
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


def poisson_batch(sampler, data, batch_size, pad_to):
  """The sampler's next Poisson sample (expected size `batch_size`), padded with masked rows to `pad_to`."""
  idx = sampler.sample(batch_size)
  if len(idx) > pad_to:  # dropping examples would break the Poisson accounting
    raise RuntimeError(f"Poisson batch of {len(idx)} exceeds the padded size {pad_to}.")
  mask = np.zeros(pad_to, np.float32)
  mask[: len(idx)] = 1
  idx = np.concatenate([idx, np.zeros(pad_to - len(idx), idx.dtype)])
  return {k: v[idx] for k, v in data.items()}, mask


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
  """NNX: `nnx.split` gives the trainable state; `nnx.merge` rebuilds the model inside the loss."""
  graphdef, params = nnx.split(NNXMLP(data["x"].shape[1], nnx.Rngs(seed)), nnx.Param)
  return params, lambda p, x: nnx.merge(graphdef, p)(x)


def train(make_model, data, *, steps, batch_size, private, clip_norm=1.0, noise_multiplier=1.0, lr=0.5,
          seed=0):
  """The same Optax loop, non-private or private; the private lines are marked `# DP`."""
  params, logits = make_model(data, seed)
  opt = optax.sgd(lr, momentum=0.9)
  opt_state = opt.init(params)
  n = len(data["y"])

  if not private:
    def loss_fn(p, batch):  # mean over the batch
      return optax.softmax_cross_entropy_with_integer_labels(logits(p, batch["x"]), batch["y"]).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  else:
    def loss_fn(p, example):  # DP: per-example loss
      return optax.softmax_cross_entropy_with_integer_labels(logits(p, example["x"]), example["y"])

    grad_fn = dpmega.private_value_and_grad(  # DP: the private gradient
        loss_fn, clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_batch_size=batch_size,
        microbatch_size=batch_size // 2)

  @jax.jit
  def apply(p, s, g):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  rng = np.random.default_rng(seed)
  secret = dpmega.secret_bytes()  # DP: 256 secret bits from the OS CSPRNG key the sampling and the noise
  sampler = dpmega.PoissonSampler(n, secret=secret)  # DP: Poisson sampling, q = batch_size / n
  losses = []
  for step in range(steps):
    if private:
      batch, mask = poisson_batch(sampler, data, batch_size, pad_to=2 * batch_size)
      loss, grads, _ = grad_fn(params, batch, dpmega.step_key(secret, step), mask=mask)  # DP: secret step key
    else:
      idx = rng.choice(n, batch_size, replace=False)
      loss, grads = grad_fn(params, {k: v[idx] for k, v in data.items()})
    params, opt_state = apply(params, opt_state, grads)
    losses.append(float(loss))
  return losses, accuracy(lambda x: logits(params, x), data)


def epsilon(*, n, batch_size, steps, noise_multiplier, delta):
  """RDP epsilon of `steps` Poisson-sampled Gaussian steps (add/remove-one neighbours)."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(batch_size / n, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
  return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


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
      losses, acc = train(make_model, data, steps=args.steps, batch_size=args.batch_size, private=private,
                          noise_multiplier=args.noise_multiplier)
      name = f"{api}/{'private' if private else 'non-private'}"
      results[name] = {"first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])), "accuracy": acc}
      print(f"{name:18s} loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}   train accuracy {acc:.3f}")
  eps = epsilon(n=len(data["y"]), batch_size=args.batch_size, steps=args.steps,
                noise_multiplier=args.noise_multiplier, delta=1e-5)
  print(f"private runs: epsilon = {eps:.2f} at delta = 1e-05 (RDP, Poisson sampling, add/remove-one neighbours)")
  results["epsilon"] = eps
  return results


if __name__ == "__main__":
  main()
