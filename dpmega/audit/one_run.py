"""The one-run training audit (Steinke, Nasr, Jagielski 2023): canaries, one tiny DP-SGD run, the bound.

``m`` canaries, each in the training set with probability 1/2, are trained on
with DP-SGD (Poisson sampling, the library's private gradient, an optax
optimizer); each is scored from the final parameters and the ε lower bound is
computed by ``jax_privacy.auditing`` (install ``dpmega[audit]``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dpmega import validation
from dpmega.audit.claims import claimed_epsilon
from dpmega.audit.claims import gaussian_mechanism_epsilon
from dpmega.audit.results import AuditResult
from dpmega.audit.stats import check_scores

# The public constant the one-run canaries' target is set to, relative to C:
# large enough that a canary's gradient points the same way however training
# moves its coordinate, so every canary gradient is clipped to exactly C.
_CANARY_TARGET = 1.0e4


def _jax_privacy_auditing():
  try:
    from jax_privacy import auditing  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "the one-run audit uses jax_privacy.auditing (Steinke, Nasr, Jagielski 2023): "
        "pip install 'dpmega[audit]' (jax-privacy==2.0.0, Python >= 3.11).") from e
  return auditing


def one_run_epsilon_lower_bound(in_scores: Any, out_scores: Any, *, delta: float,
                                confidence: float = 0.95, num_guesses: int | None = None) -> float:
  """ε lower bound of the one-run audit (Steinke, Nasr, Jagielski 2023, Theorem 3.1).

  The auditor guesses "included" for canaries whose score is at least a
  threshold (one-sided guesses, ``k_- = 0`` in the paper) and counts correct
  guesses; the bound is the largest ε whose p-value for that many correct
  guesses among ``r`` is below ``1 - confidence``. Computed by
  ``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run``.

  Args:
    in_scores: scores of the canaries that were included (higher = more "in").
    out_scores: scores of the canaries that were not. ``m`` is the total count.
    delta: δ in (0, 1).
    confidence: in [0.5, 1).
    num_guesses: ``None``: every threshold is tried, with a Bonferroni
      correction over them (jax_privacy's default). An int ``k``: the paper's
      fixed ``k_+ = k`` -- guess "in" for the ``k`` highest scores (ties at the
      k-th score are all guessed); fix it before seeing the scores.

  Returns:
    The lower bound, >= 0.
  """
  in_s = check_scores("in_scores", in_scores)
  out_s = check_scores("out_scores", out_scores)
  delta = validation.check_real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
  significance = 1.0 - validation.check_real("confidence", confidence, 0.5, 1.0, hi_open=True)
  auditing = _jax_privacy_auditing()
  auditor = auditing.CanaryScoreAuditor(in_s, out_s)
  if num_guesses is None:
    strategy = auditing.Bonferroni()
  else:
    k = validation.check_int("num_guesses", num_guesses, 1, in_s.size + out_s.size)
    threshold = np.sort(np.concatenate([in_s, out_s]))[::-1][k - 1]
    strategy = auditing.Explicit(float(threshold))
  return max(0.0, float(auditor.epsilon_one_run(significance, delta, threshold_strategy=strategy)))


# Dense floats the one-run model may hold per array ((m + background) x (m + 8)).
_MAX_ONE_RUN_FLOATS = 10**8


def check_one_run_size(num_canaries: Any, num_background: Any) -> tuple[int, int]:
  """Validates the one-run audit's sizes (the model is dense: memory grows as m^2)."""
  m = validation.check_int("num_canaries", num_canaries, 2, 10**4)
  n_bg = validation.check_int("num_background", num_background, 0, 10**4)
  if (m + n_bg) * (m + 8) > _MAX_ONE_RUN_FLOATS:
    raise ValueError(
        f"num_canaries and num_background: (num_canaries + num_background) x (num_canaries + 8) must be "
        f"at most {_MAX_ONE_RUN_FLOATS:.0e} floats, got {num_canaries=}, {num_background=}.")
  return m, n_bg


def one_run_training_audit(
    *,
    noise_multiplier: float,
    num_canaries: int = 1000,
    num_background: int = 256,
    steps: int = 8,
    batch_size: int | None = None,
    clip_norm: float = 1.0,
    learning_rate: float = 1.0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    accountant: str = "pld",
    num_guesses: int | None = None,
    noise_scale_for_testing: float = 1.0,
) -> AuditResult:
  """Audits a whole (tiny) DP-SGD training run in one run (Steinke et al. 2023).

  The model is linear regression on ``num_background`` generated examples plus
  ``num_canaries`` canaries; canary ``j`` owns parameter coordinate ``j`` (its
  input is a one-hot there and its target is far away, so its gradient is
  always clipped to exactly ``C`` along that coordinate). Each canary is in the
  training set independently with probability 1/2. Training: ``steps`` DP-SGD
  steps, each on a Poisson sample with rate ``batch_size / (num_background +
  num_canaries)`` drawn by :class:`dpmega.sampling.PoissonSampler` (canaries
  not in the training set are masked out), private gradient by
  :func:`dpmega.private_value_and_grad`, update by ``optax.sgd``. After
  training, canary ``j`` is scored by how far its coordinate moved towards its
  target (white-box on the final parameters only), and the bound is
  :func:`one_run_epsilon_lower_bound`. The claim is the accountant's ε for
  ``steps`` Poisson steps at that rate and σ.

  Args:
    noise_multiplier: σ, > 0.
    num_canaries: m, in [2, 10^4].
    num_background: other training examples, in [0, 10^4] (the dense model
      holds ``(m + num_background) x (m + 8)`` floats, at most 10^8).
    steps: DP-SGD steps, in [1, 10^5].
    batch_size: expected batch size (int); None: every example every step (q = 1).
    clip_norm: C > 0.
    learning_rate: SGD learning rate > 0.
    delta: δ in (0, 1).
    confidence: in [0.5, 1).
    seed: seed of canary inclusion, sampling, data and noise.
    accountant: ``"pld"`` or ``"rdp"``.
    num_guesses: see :func:`one_run_epsilon_lower_bound`.
    noise_scale_for_testing: TEST-ONLY, as in :func:`mechanism_audit`.

  Returns:
    An :class:`AuditResult` with ``num_trials = num_canaries``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from dpmega.private_grad import private_value_and_grad  # pylint: disable=import-outside-toplevel
  from dpmega.sampling import PoissonSampler  # pylint: disable=import-outside-toplevel
  from dpmega.noise import insecure_secret_from_seed  # pylint: disable=import-outside-toplevel

  sigma = validation.check_real("noise_multiplier", noise_multiplier, 0.0, 1e6, lo_open=True)
  m, n_bg = check_one_run_size(num_canaries, num_background)
  steps = validation.check_int("steps", steps, 1, 10**5)
  n = n_bg + m
  batch_size = n if batch_size is None else validation.check_int("batch_size", batch_size, 1, n)
  clip_norm = validation.check_real("clip_norm", clip_norm, 0.0, 1e12, lo_open=True)
  lr = validation.check_real("learning_rate", learning_rate, 0.0, 1e6, lo_open=True)
  delta = validation.check_real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
  confidence = validation.check_real("confidence", confidence, 0.5, 1.0, hi_open=True)
  seed = validation.check_int("seed", seed, 0, 2**31 - 1)
  scale = validation.check_real("noise_scale_for_testing", noise_scale_for_testing, 0.0, 1.0)
  if num_guesses is not None:
    validation.check_int("num_guesses", num_guesses, 1, m)
  _jax_privacy_auditing()  # fail before training if the extra is missing

  q = batch_size / n
  claimed = claimed_epsilon(noise_multiplier=sigma, delta=delta, sampling_rate=q, steps=steps,
                            accountant=accountant)
  # Without sampling, T Gaussian steps compose exactly to one with σ / sqrt(T).
  exact = gaussian_mechanism_epsilon(sigma / math.sqrt(steps), delta) if q == 1.0 else None

  rng = np.random.default_rng(seed)
  included = rng.random(m) < 0.5
  d_bg = 8
  dim = d_bg + m
  x = np.zeros((n, dim), np.float32)
  y = np.zeros((n,), np.float32)
  x[:n_bg, :d_bg] = rng.normal(size=(n_bg, d_bg))
  y[:n_bg] = x[:n_bg, :d_bg] @ rng.normal(size=d_bg) + 0.1 * rng.normal(size=n_bg)
  x[n_bg + np.arange(m), d_bg + np.arange(m)] = 1.0
  y[n_bg:] = -_CANARY_TARGET * clip_norm
  data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  in_training_set = np.concatenate([np.ones(n_bg, bool), included])

  def loss(w, example):
    return 0.5 * (jnp.dot(w, example["x"]) - example["y"]) ** 2

  grad_fn = private_value_and_grad(loss, clip_norm=clip_norm, noise_multiplier=sigma * scale,
                                   expected_batch_size=batch_size)
  optimizer = optax.sgd(lr)

  @jax.jit
  def train_step(w, opt_state, mask, key):
    _, grads, _ = grad_fn(w, data, key, mask=mask)
    updates, opt_state = optimizer.update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state

  w = jnp.zeros((dim,), jnp.float32)
  opt_state = optimizer.init(w)
  # An audit is an experiment, not a release: its sampling is reproducible from the public seed.
  sampler = PoissonSampler(n, secret=insecure_secret_from_seed(seed))
  key = jax.random.key(seed)
  for t in range(steps):
    mask = np.zeros((n,), np.float32)
    mask[sampler.sample(batch_size)] = 1.0
    mask *= in_training_set  # canaries left out of the training set are never seen
    w, opt_state = train_step(w, opt_state, jnp.asarray(mask), jax.random.fold_in(key, t))

  # Training pulls an included canary's coordinate towards its (negative) target.
  scores = -np.asarray(w, np.float64)[d_bg:]
  bound = one_run_epsilon_lower_bound(scores[included], scores[~included], delta=delta,
                                      confidence=confidence, num_guesses=num_guesses)
  details = {"num_included": int(included.sum()), "num_background": n_bg,
             "batch_size": batch_size, "learning_rate": lr, "seed": seed,
             "guesses": "all thresholds, Bonferroni" if num_guesses is None else f"top {num_guesses}",
             "score": "final parameter of the canary's coordinate, towards its target",
             "method": "Steinke, Nasr, Jagielski 2023 via jax_privacy.auditing"}
  return AuditResult(
      method="one_run", claimed_epsilon=claimed, epsilon_lower_bound=bound,
      confidence=confidence, delta=delta, num_trials=m, noise_multiplier=sigma,
      clip_norm=clip_norm, sampling_rate=None if q == 1.0 else q, steps=steps,
      noise_scale_for_testing=scale, accountant=accountant, exact_epsilon=exact, details=details)
