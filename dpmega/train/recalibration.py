"""Private recalibration of a binary classifier: a temperature and a bias fitted by DP-SGD, accounted (issue 18).

DP-SGD's models come out over-confident: the noise of the last steps spreads the
logits, so the top predictions are too high and the low ones too low (the
reliability tables of ``bench/RESULTS.md``), which costs normalized entropy
(NE) although the ranking (AUC) is fine. Platt scaling fixes that after
training: predict ``sigmoid(a z + b)`` for the model's logit ``z``, with ``a``
(the inverse temperature) and ``b`` fitted by logistic regression. Fitted on
the training data, the fit is a release about the training data, so here it is
private: ``recalibration.steps`` steps of DP-SGD on ``(a, b)`` after the last
training step, with the model frozen.

Each recalibration step is a step of the run like the others, and is accounted
as one:

* the batch is Poisson-sampled (the run's sampler and scheme) at the schedule's
  final expected batch size ``B``;
* example ``i``'s gradient of the logistic loss in ``(a, b)`` is
  ``g_i = (sigmoid(a z_i + b) - y_i) (z_i, 1)``, clipped to L2 norm
  ``recalibration.clip_norm`` (``C_r``); an example whose logit or label is
  not finite contributes zero (invariant 4);
* the clipped sum gets ``N(0, (sigma C_r)^2)`` per coordinate from the step's
  secret noise key, with the run's sigma and noise sampler, and is divided by
  ``B``; then Adam on ``(a, b)`` (cosine decay to 0 over the steps).

So a recalibration step is a sampled Gaussian mechanism with the run's q and
sigma: the same event as a training step, recorded in the journal and the
ledger as step ``num_steps + j``, and the privacy plan (sigma calibrated to
``target_epsilon``, the budget stop, the printed epsilon curve) covers
``num_steps + recalibration.steps`` steps, the last ones at the final batch
size (:class:`dpmega.train.privacy.RunPrivacy`). ``(a, b)`` is a function of
these releases and of the released model only, so the calibrated model's
guarantee is the run's epsilon.

The clip norm sets a bias: an example whose gradient norm ``|p - y| sqrt(z^2 +
1)`` exceeds ``C_r`` pulls less than it should, and those are the confident
mistakes that show over-confidence, so ``C_r`` should exceed most ``|z|``
(default 10: a logit of 10 is a probability of 0.99995). The noise on the mean
is ``sigma C_r / B`` per coordinate, small at the batch sizes this library is
for.

Resume: the recalibration keeps no checkpoint of its own. A run that stops in
it resumes from the checkpoint of step ``num_steps`` and redoes the
recalibration with the same keys and samples (the journal counts a replayed
step once); a changed recalibration config is refused at the resume (it is part
of the run's computation, :func:`dpmega.train.identity.fingerprint`), since
redoing a step with its noise key on another computation would release the
difference.

Only a task that gives its logits (:attr:`dpmega.tasks.Task.predict_logits`:
the CTR tasks) can be recalibrated, on one process.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpmega import noise as noise_lib
from dpmega.train import config as config_lib
from dpmega.train.report import TrainingError


def clipped_gradient_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array, head: jax.Array,
                         clip_norm: float | jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The clipped sum over examples of the logistic loss's gradient in ``head = (a, b)``; and the counts.

  Args:
    logits: ``[n]`` the model's logits ``z``.
    labels: ``[n]`` the labels ``y`` (0 or 1).
    mask: ``[n]`` 1 for a real example, 0 for padding.
    head: ``[2]`` float32 ``(a, b)``.
    clip_norm: ``C_r``.

  Returns:
    ``(sum [2], num_clipped, num_nonfinite)``. Each example's contribution has L2 norm at most ``C_r`` (up to
    the rounding of one division, for every finite or non-finite input): the gradient ``r (z, 1)``,
    ``r = sigmoid(a z + b) - y``, is formed as ``r s v`` with ``s = max(|z|, 1)`` and ``v = (z, 1) / s`` (norm in
    [1, sqrt 2]), so no intermediate overflows; a clipped example contributes ``C_r sign(r) v / |v|``.

  Example:
    >>> s, k, bad = clipped_gradient_sum(jnp.array([0.0, 20.0, jnp.nan]), jnp.array([1.0, 0.0, 1.0]),
    ...                                  jnp.ones(3), jnp.array([1.0, 0.0]), 1.0)
    >>> [round(float(x), 4) for x in s], int(k), int(bad)  # (0, -0.5) + (20, 1)/sqrt(401); the NaN drops
    ([0.9988, -0.4501], 1, 1)
  """
  z = jnp.asarray(logits, jnp.float32)
  y = jnp.asarray(labels, jnp.float32)
  real = jnp.asarray(mask, jnp.float32) > 0
  finite = jnp.isfinite(z) & jnp.isfinite(y)
  keep = real & finite
  z = jnp.where(keep, z, 0.0)
  y = jnp.where(keep, y, 0.0)
  a, b = head[0], head[1]
  r = jax.nn.sigmoid(a * z + b) - y
  s = jnp.maximum(jnp.abs(z), 1.0)
  v = jnp.stack([z / s, 1.0 / s], axis=-1)  # [n, 2], norm in [1, sqrt 2]
  v_norm = jnp.sqrt(jnp.sum(v * v, axis=-1))
  norm = jnp.abs(r) * s * v_norm  # may be inf for a huge label: then clipped
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  clipped = norm > clip_norm
  plain = (r * s)[:, None] * v
  bounded = (clip_norm * jnp.sign(r) / v_norm)[:, None] * v
  contribution = jnp.where(clipped[:, None], bounded, plain)
  contribution = jnp.where(keep[:, None], contribution, 0.0)
  return (jnp.sum(contribution, axis=0), jnp.sum(clipped & keep).astype(jnp.int32),
          jnp.sum(real & ~finite).astype(jnp.int32))


def make_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
  """Adam on ``(a, b)``, its rate decayed to 0 by a cosine over the ``steps`` steps."""
  return optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))


def run(trainer: Any, params: Any, sigma: float, ledger: Any, *, first_step: int,
        out: Callable[[str], None]) -> tuple[dict[str, float], list[dict[str, Any]], str | None]:
  """The recalibration steps of ``trainer`` (a :class:`dpmega.train.loop.Trainer`) on the frozen ``params``.

  Step ``j`` is the run's step ``first_step + j``: its sample, its noise key, its journal record and its
  ledger entry (``ledger``, updated here). Returns ``(calibration, history, stop_reason)``; the calibration
  is ``{"temperature": a, "bias": b}`` (``a = 1, b = 0``, the model unchanged, if the budget stops the first
  step).
  """
  cfg, rc = trainer.cfg, trainer.cfg.recalibration
  predict = jax.jit(trainer.task.predict_logits)
  grad_sum = jax.jit(clipped_gradient_sum)
  optimizer = make_optimizer(rc.learning_rate, rc.steps)
  head = jnp.array([1.0, 0.0], jnp.float32)
  opt_state = optimizer.init(head)
  history, stop_reason = [], None
  privacy = trainer.privacy
  epsilon = privacy.epsilon(trainer.spent)
  for j in range(rc.steps):
    t = first_step + j
    replay = (trainer.generation, t) in trainer.journal.steps()
    if cfg.target_epsilon is not None and not replay:
      stop_reason = privacy.budget_stop(trainer.spent, t, sigma, epsilon)
      if stop_reason:
        out(stop_reason + " (recalibration)")
        break
    expected, indices, prepare = trainer.sample_step(t)  # the task's preparation keyed as a training step's
    total = jnp.zeros(2, jnp.float32)
    num_clipped = 0
    for i, chunk in enumerate(trainer.private_step.chunks(trainer.task.train_source, indices)):
      batch = chunk.batch if prepare is None else prepare(i, chunk.batch)
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
      s, k, _ = grad_sum(predict(params, batch), batch[trainer.task.label_key], chunk.mask, head, rc.clip_norm)
      total, num_clipped = total + s, num_clipped + int(k)
    trainer._spend(t, sigma)  # noqa: SLF001 - durably in the journal BEFORE the noisy release exists
    noisy = noise_lib.privatize(total, trainer.noise_key(t), noise_multiplier=sigma, clip_norm=rc.clip_norm,
                                expected_batch_size=expected, sampler=cfg.noise_sampler)
    updates, opt_state = optimizer.update(noisy, opt_state, head)
    head = optax.apply_updates(head, updates)
    privacy.record(ledger, t, sigma)
    epsilon = privacy.epsilon(trainer.spent)
    record = {"step": t + 1, "recalibration_step": j + 1, "generation": trainer.generation,
              "batch_size": expected, "temperature": float(head[0]), "bias": float(head[1]),
              "noisy_grad_norm": float(jnp.linalg.norm(noisy)), "sigma": sigma, "epsilon": epsilon,
              "delta": cfg.delta}
    if cfg.metrics is config_lib.MetricsMode.RAW:  # raw statistics of the private batch: for the operator, never for release
      record["clipped_fraction"] = num_clipped / max(len(indices), 1)
    history.append(record)
    if cfg.log_every and ((j + 1) % max(1, cfg.log_every) == 0 or j + 1 == rc.steps):
      out(f"recalibration step {j + 1}/{rc.steps} (step {t + 1})  temperature a {record['temperature']:.4f}  "
          f"bias b {record['bias']:+.4f}  epsilon {epsilon:.4g}")
  if not np.all(np.isfinite(np.asarray(head))):
    raise TrainingError(f"recalibration diverged: (a, b) = {np.asarray(head).tolist()}; lower "
                       "recalibration.learning_rate.")
  return {"temperature": float(head[0]), "bias": float(head[1])}, history, stop_reason
