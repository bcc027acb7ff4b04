"""Adaptive clip norm: track a quantile of the per-example gradient norms privately (Andrew et al. 2021).

After each step the clip norm moves geometrically toward the ``target_quantile``
of the norms::

  C_{t+1} = C_t * exp(-eta_C * (b~_t - gamma))

with ``b~_t`` the noisy fraction of examples left unclipped. The step already
releases the noisy clipped count ``K~_t = K_t + N(0, sigma_b^2)``
(``clipped_count_noise``); ``b~_t = 1 - K~_t / B_t`` with ``B_t`` the
expected (public) batch size. Under Poisson sampling ``E[b_t] = B_t``, so
``b~_t`` is an unbiased estimate of the unclipped fraction ``(b_t - K_t) / B_t``;
only public quantities and noisy releases enter it, so ``C_{t+1}`` is
post-processing.

Privacy: the pair (noisy sum, noisy count) is accounted at
:func:`dpmega.train.step.effective_noise_multiplier` (the gradient's sigma is
raised so that the pair composes to the configured sigma: the count's budget
share is in the ledger and in epsilon). With clip norm ``C_t`` the gradient
noise is ``N(0, (sigma C_t)^2)``: the noise multiplier, and so the accounting,
do not depend on ``C_t``.

How the step clips at a traced ``C_t`` without a new clipping engine
(:func:`dpmega.train.accumulate.make_accumulate_fn` with ``adaptive=True``): it clips
the gradient of ``loss / C_t`` at norm 1 and multiplies the clipped sum by
``C_t``. The engine bounds each clipped contribution by ``1 * (1 + 1e-5)`` for
every input, so each example's scaled contribution is at most
``C_t (1 + 1e-5)(1 + 2^-23)`` (one float32 product more); the update is built
with clip norm 1 and noise multiplier ``sigma * C_t``.

The clip norm is train state: it is saved in every checkpoint and a resume
continues with the saved value.

References:
  Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS 2021. https://arxiv.org/abs/1905.03871
"""

from __future__ import annotations

import math

from dpmega import validation


def check_settings(target_quantile: float, learning_rate: float, clip_norm: float) -> None:
  """Raises ``ValueError`` naming the first setting out of range."""
  validation.check_real("adaptive_clip_quantile", target_quantile, 0.0, 1.0, lo_open=True, hi_open=True)
  validation.check_real("adaptive_clip_lr", learning_rate, 0.0, math.inf, lo_open=True, hi_open=True)
  validation.check_real("clip_norm", clip_norm, 0.0, math.inf, lo_open=True, hi_open=True)


def next_clip_norm(clip_norm: float, noisy_clipped_count: float, expected_batch_size: float, *,
                   target_quantile: float, learning_rate: float) -> float:
  """``C_{t+1}`` from ``C_t`` and the step's noisy clipped count (the module docstring).

  Args:
    clip_norm: ``C_t > 0``.
    noisy_clipped_count: ``K~_t``, the released noisy number of clipped examples (any real).
    expected_batch_size: ``B_t > 0`` (public).
    target_quantile: ``gamma`` in (0, 1): the fraction of examples to leave unclipped.
    learning_rate: ``eta_C > 0``.

  Returns:
    ``C_t * exp(-eta_C * ((1 - K~_t / B_t) - gamma))``.

  Edge cases: the noisy fraction is not clamped to [0, 1] (clamping would bias
  it); the result is positive and finite for finite inputs.

  Example:
    >>> round(next_clip_norm(1.0, 10.0, 100.0, target_quantile=0.5, learning_rate=0.2), 6)  # 90% unclipped
    0.923116
  """
  if not expected_batch_size > 0:
    raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size=}.")
  unclipped = 1.0 - float(noisy_clipped_count) / float(expected_batch_size)
  return float(clip_norm) * math.exp(-learning_rate * (unclipped - target_quantile))
