"""Flax's NNX MNIST loop made private two ways, side by side: dpmega (the vendored private copy) and jax_privacy.

One job: measure test accuracy and epsilon of the same upstream loop (tests/flax_upstream/flax_mnist_nnx.py) at
the same sigma, C, expected batch B, steps, optimizer and data, converted with

* ``dpmega``: ``flax_mnist_nnx_private.py`` as it is (its ``CNN`` with GroupNorm, its ``train_step`` with
  ``dpmega.nnx_value_and_grad(..., clip_norm=C)``, batches from ``dpmega.PoissonData``);
* ``jax_privacy``: the same GroupNorm ``CNN`` and ``loss_fn``, ``jax_privacy.clipped_grad`` (``keep_batch_dim``,
  ``prng_argnum`` for per-example dropout keys, ``is_padding_example`` from the same kind of Poisson batches),
  ``noise_addition.gaussian_privatizer(stddev=sigma * C)``, the noisy sum divided by B, the same
  ``nnx.Optimizer(optax.sgd(lr, momentum))``; epsilon from jax_privacy's ``DpsgdTrainingAccountant``;
* ``nonprivate``: the upstream loop (BatchNorm, ``nnx.value_and_grad``, shuffled fixed batches of B);
* ``nonprivate_gn``: the private copy's GroupNorm CNN trained without DP (what the model change alone costs).

Differences that cannot be avoided: each arm draws its own Poisson batches and noise (different secrets/keys);
dpmega's noise is its wide-tail sampler, jax_privacy's ``jax.random.normal``. Steps are counted, not epochs.

Usage (sizes from the environment, as the vendored example reads them)::

  MNIST_SWAP_TRAIN=60000 MNIST_SWAP_TEST=10000 python bench/flax_mnist_peer.py --steps 469 --seeds 0,1
  MNIST_SWAP_TRAIN=384 MNIST_SWAP_TEST=1024 python bench/flax_mnist_peer.py --steps 8 --batch-size 48 \
      --seeds 0,1,2,3,4,5 --arms dpmega,jax_privacy,nonprivate_gn   # the CI test's size, 8 steps

Results and what they mean: bench/RESULTS.md, "Flax NNX MNIST: dpmega vs jax_privacy".
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "flax_upstream"))
import flax_mnist_nnx as upstream  # noqa: E402  pylint: disable=wrong-import-position
import flax_mnist_nnx_private as private  # noqa: E402  pylint: disable=wrong-import-position
import mnist_swap  # noqa: E402  pylint: disable=wrong-import-position

import dpmega  # noqa: E402  pylint: disable=wrong-import-position

DELTA = 1e-5


def evaluate(module, model, test):
  """Test accuracy of ``model`` on every test example, with the module's own ``eval_step`` (eval mode)."""
  n = len(test["label"])
  batch_size = max(d for d in range(1, min(n, 512) + 1) if n % d == 0)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  model.eval()
  for batch in mnist_swap.Batches(test, batch_size).as_numpy_iterator():
    module.eval_step(model, metrics, batch)
  return float(metrics.compute()["accuracy"])


def private_model(seed, norm):
  """The private copy's ``CNN`` (GroupNorm), or with its two norm layers swapped (the ablation of ``--norm``).

  ``frozen_bn``: upstream's ``nnx.BatchNorm`` with ``use_running_average=True`` (its statistics frozen at their
  initial values, so a per-channel affine map); ``gn<k>``: ``nnx.GroupNorm(num_groups=k)``; ``layernorm``:
  ``nnx.LayerNorm`` over the channels; ``none``: identity.
  """
  model = private.CNN(rngs=nnx.Rngs(seed))
  rngs = nnx.Rngs(seed + 100)
  for name, width in (("batch_norm1", 32), ("batch_norm2", 64)):
    if norm == "frozen_bn":
      setattr(model, name, nnx.BatchNorm(width, use_running_average=True, rngs=rngs))
    elif norm.startswith("gn") and norm != "gn32":
      setattr(model, name, nnx.GroupNorm(width, num_groups=int(norm[2:]), rngs=rngs))
    elif norm == "layernorm":
      setattr(model, name, nnx.LayerNorm(width, rngs=rngs))
    elif norm == "none":
      setattr(model, name, lambda x: x)
    elif norm not in ("groupnorm", "gn32"):
      raise ValueError(f"--norm must be groupnorm, gn<k>, frozen_bn, layernorm or none, got {norm!r}.")
  return model


def train_mode(model):
  """Dropout on; BatchNorm left as built (``model.train()`` would unfreeze a frozen BatchNorm)."""
  model.set_attributes(deterministic=False, raise_if_not_found=False)


def progress(t, args, every=25):
  if (t + 1) % every == 0:
    print(f"  step {t + 1}/{args.steps} at {time.strftime('%H:%M:%S')}", flush=True)


def make_optimizer(model, args):
  return nnx.Optimizer(model, optax.sgd(args.lr, args.momentum), wrt=nnx.Param)


def metrics_():
  return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def run_nonprivate(module, train, test, args, seed):
  """The upstream step (``nnx.value_and_grad``) on shuffled fixed batches of B."""
  model = module.CNN(rngs=nnx.Rngs(seed)) if module is upstream else private_model(seed, args.norm)
  optimizer, metrics, rngs = make_optimizer(model, args), metrics_(), nnx.Rngs(seed)
  model.train() if module is upstream else train_mode(model)
  done = 0
  ds = mnist_swap.Batches(train, args.batch_size, shuffle=True, seed=seed)
  while done < args.steps:
    for batch in ds.as_numpy_iterator():
      if done == args.steps:
        break
      upstream.train_step(model, optimizer, metrics, batch, rngs)
      done += 1
  return evaluate(module, model, test), float("nan")


def run_dpmega(train, test, args, seed):
  """The private copy's own ``train_step`` on ``dpmega.PoissonData`` batches."""
  data = dpmega.PoissonData(train, expected_batch_size=args.batch_size, noise_multiplier=args.sigma)
  model = private_model(seed, args.norm)
  optimizer, metrics, rngs = make_optimizer(model, args), metrics_(), nnx.Rngs(seed)
  train_mode(model)
  for t, batch in enumerate(data.batches(args.steps)):
    private.train_step(model, optimizer, metrics, batch, rngs)
    progress(t, args)
  return evaluate(private, model, test), data.epsilon(DELTA)


def run_jax_privacy(train, test, args, seed):
  """``jax_privacy.clipped_grad`` + ``gaussian_privatizer`` on the same GroupNorm model, loss and optimizer."""
  import jax_privacy  # pylint: disable=import-outside-toplevel
  from jax_privacy import noise_addition  # pylint: disable=import-outside-toplevel
  from jax_privacy.accounting import accountants, analysis  # pylint: disable=import-outside-toplevel

  data = dpmega.PoissonData(train, expected_batch_size=args.batch_size, noise_multiplier=args.sigma)
  model = private_model(seed, args.norm)
  optimizer = make_optimizer(model, args)
  train_mode(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, batch, key):  # the private copy's loss_fn on one example (batch axis 1), its own dropout key
    return private.loss_fn(nnx.merge(graphdef, params, rest), batch, nnx.Rngs(key))

  grad_fn = jax_privacy.clipped_grad(loss, l2_clip_norm=args.clip, batch_argnums=1, keep_batch_dim=True,
                                     has_aux=True, prng_argnum=2)
  privatizer = noise_addition.gaussian_privatizer(stddev=args.sigma * args.clip, prng_key=jax.random.key(seed + 1))
  noise_state = privatizer.init(params)

  @nnx.jit
  def train_step(model, optimizer, noise_state, batch, mask, key):
    _, params, _ = nnx.split(model, nnx.Param, ...)
    grad_sum, _ = grad_fn(params, batch, key, is_padding_example=mask == 0)
    noisy, noise_state = privatizer.update(grad_sum, noise_state)
    optimizer.update(model, jax.tree.map(lambda g: g / args.batch_size, noisy))
    return noise_state

  key = jax.random.key(seed + 2)
  for t, step in enumerate(data.steps(args.steps)):
    batch = dict(data.source.take(step.indices))
    key, sub = jax.random.split(key)
    noise_state = train_step(model, optimizer, noise_state, batch, jnp.asarray(step.key.mask), sub)
    progress(t, args)
  dp_params = analysis.DpParams(noise_multipliers=args.sigma, num_samples=len(train["label"]), delta=DELTA,
                               batch_size=args.batch_size)
  accountant = analysis.DpsgdTrainingAccountant(dp_accountant_config=accountants.RdpAccountantConfig())
  eps = accountant.compute_epsilon(num_updates=args.steps, dp_params=dp_params)
  return evaluate(private, model, test), float(eps)


ARMS = {
    "nonprivate": lambda tr, te, a, s: run_nonprivate(upstream, tr, te, a, s),
    "nonprivate_gn": lambda tr, te, a, s: run_nonprivate(private, tr, te, a, s),
    "dpmega": run_dpmega,
    "jax_privacy": run_jax_privacy,
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=469)
  parser.add_argument("--batch-size", type=int, default=128, help="B (expected batch for the private arms)")
  parser.add_argument("--sigma", type=float, default=1.0)
  parser.add_argument("--clip", type=float, default=1.0)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--norm", default="groupnorm", help="the private arms' norm layers: groupnorm (the private "
                      "copy's), gn<k>, frozen_bn, layernorm, none")
  parser.add_argument("--arms", default="nonprivate,dpmega,jax_privacy")
  args = parser.parse_args(argv)
  train, test = mnist_swap.load()
  print(f"N={len(train['label'])} test={len(test['label'])} B={args.batch_size} steps={args.steps} "
        f"sigma={args.sigma} C={args.clip} lr={args.lr} momentum={args.momentum} norm={args.norm}", flush=True)
  for seed in [int(s) for s in args.seeds.split(",")]:
    for arm in args.arms.split(","):
      t0 = time.time()
      acc, eps = ARMS[arm](train, test, args, seed)
      print(f"seed={seed} arm={arm:14s} test_acc={acc * 100:6.2f}% eps={eps:.3f} time={time.time() - t0:.0f}s",
            flush=True)


if __name__ == "__main__":
  main()
