"""The white-box audit of the sparse step: the row selection and the sparse noisy gradient on one Poisson sample.

:func:`sparse_mechanism_audit` is :func:`dpmega.audit.mechanism_audit` for
sparsity-preserving DP-SGD (:mod:`dpmega.sparse`, DP-AdaFEST). Each run draws
the library's real release of one logical step,
:func:`dpmega.sparse.sparse_privatize` -- the clipped row-touch counts with
noise ``σ1 C1`` above ``τ = threshold · σ1 · C1``, then the clipped gradient
with noise ``σ2 C`` on the dense leaf and the selected rows of the table --
on a batch *without* and *with* a canary. The canary touches one row that no
other example touches (row 0, so its count is 0 without it and ``C1`` with it)
and its gradient, huge along that row's first coordinate, is clipped to ``C``:
the largest move one example makes in both releases at once. Background
examples touch the other rows and the dense leaf.

Score of a run (what an attacker sees in the release): the released gradient
of row 0 along the canary's coordinate, times ``B / C``, when row 0 is
selected, and ``-1000`` when it is not (selection and gradient both move up
with the canary). The ε lower bound is
:func:`dpmega.audit.stats.holdout_epsilon_lower_bound`'s, compared with the
accountant's claim for ONE Gaussian step at ``σ_eff = (σ1⁻² + σ2⁻²)^(-1/2)``
(what the trainer's ledger records; :mod:`dpmega.sparse.selection`).

Guarantee: if the sparse step is (ε, δ)-DP at ``σ_eff`` for add/remove of one
example, ``P[epsilon_lower_bound > ε] <= 1 - confidence``.
``noise_scale_for_testing < 1`` multiplies ``σ_eff`` (so σ1 and σ2) handed to
the library, not the claim: the tests show the audit detects it.
"""

from __future__ import annotations

import numpy as np

from dpmega import validation
from dpmega.audit.claims import claimed_epsilon
from dpmega.audit.claims import gaussian_mechanism_epsilon
from dpmega.audit.claims import ledger_sizes
from dpmega.audit.results import AuditResult
from dpmega.audit.stats import holdout_epsilon_lower_bound

_CHUNK = 2048  # trials per jitted call
_NOT_SELECTED = -1000.0  # the score of a run whose release leaves the canary's row out


def _sparse_runs(*, sigma: float, selection_fraction: float, threshold: float, count_clip: float, clip_norm: float,
                 sampling_rate: float | None, trials: int, num_background: int, rows: int, dim: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
  """Scores of ``trials`` runs without and with the canary, and the selection rate of row 0 in each."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from dpmega import clipping  # pylint: disable=import-outside-toplevel
  from dpmega import sparse  # pylint: disable=import-outside-toplevel

  q = 1.0 if sampling_rate is None else sampling_rate
  expected_batch_size = q * (num_background + 1)  # public, the same for both inputs
  rng = np.random.default_rng(seed)
  background = {"ids": rng.integers(1, rows, size=(num_background, 1)).astype(np.int32),
                "x": (rng.normal(size=(num_background, dim)) * clip_norm).astype(np.float32),
                "y": (rng.normal(size=(num_background, dim)) * clip_norm).astype(np.float32)}
  canary = {"ids": np.zeros((1, 1), np.int32), "x": np.zeros((1, dim), np.float32), "y": np.zeros((1, dim), np.float32)}
  canary["x"][0, 0] = 1e3 * clip_norm
  # One batch for both neighbouring inputs: the canary is the last example, and without it (world 0) its mask is
  # 0, which removes it exactly (a masked example adds exactly 0 to the clipped sum and to the row counts, as the
  # trainer's padding relies on). One program for both worlds; σ and the seed are arguments, not constants.
  batch = {k: np.concatenate([background[k], canary[k]]) for k in background}
  is_canary = np.arange(num_background + 1) == num_background
  table = ("table",)
  spec = sparse.SparseTables((table,), sparse.SelectionConfig(
      count_clip=count_clip, threshold=threshold, selection_fraction=selection_fraction, max_rows=rows,
      max_touched=rows, threshold_in_noise_sd=True))
  params = {"table": jnp.zeros((rows, dim), jnp.float32), "dense": jnp.zeros((dim,), jnp.float32)}

  def loss(p, ex):  # the gradient of example e: e["x"] on row e["ids"][0] of the table, e["y"] on the dense leaf
    return jnp.dot(p["table"][ex["ids"][0]], ex["x"]) + jnp.dot(p["dense"], ex["y"])

  def one_run(batch, present, noise_multiplier, key):
    noise_key, sample_key = jax.random.split(key)
    b = batch["x"].shape[0]
    mask = jnp.where(is_canary, present, 1.0).astype(jnp.float32)
    if sampling_rate is not None:
      mask = mask * jax.random.bernoulli(sample_key, q, (b,)).astype(jnp.float32)
    grad_sum, _, _ = clipping.clipped_grad_sum(loss, params, batch, mask, clip_norm=clip_norm, clipping="vmap")
    counts, = sparse.clipped_row_counts([batch["ids"]], mask, [rows], count_clip)
    # The trainer's layout (compact counts of the touched rows, ascending) and so its selection path.
    touched = jnp.nonzero(counts > 0, size=rows, fill_value=rows)[0].astype(jnp.int32)
    rc = sparse.TouchedRowCounts(counts.at[touched].get(mode="fill", fill_value=0.0), touched,
                                 jnp.sum(counts > 0, dtype=jnp.int32))
    release = sparse.sparse_privatize(grad_sum, {table: rc}, noise_key, spec=spec, noise_multiplier=noise_multiplier,
                                      clip_norm=clip_norm, expected_batch_size=expected_batch_size)
    ids, valid = release.rows[table]
    slot = (ids == 0) & valid
    g0 = jnp.sum(jnp.where(slot, release.grads["table"][:, 0], 0.0)) * (expected_batch_size / clip_norm)
    selected = jnp.any(slot)
    return jnp.where(selected, g0, _NOT_SELECTED), selected

  @jax.jit
  def runs(batch, world, chunk, noise_multiplier, seed):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), world), chunk)
    present = world.astype(jnp.float32)
    return jax.vmap(one_run, in_axes=(None, None, None, 0))(batch, present, noise_multiplier,
                                                             jax.random.split(key, _CHUNK))

  scores, rates = {}, {}
  for w, world in enumerate(("out", "in")):
    parts = [runs(batch, np.int32(w), np.int32(c), np.float32(sigma), np.int32(seed))
             for c in range(-(-trials // _CHUNK))]
    scores[world] = np.concatenate([np.asarray(s) for s, _ in parts])[:trials].astype(np.float64)
    rates[world] = float(np.mean(np.concatenate([np.asarray(x) for _, x in parts])[:trials]))
  return scores["in"], scores["out"], rates


def sparse_mechanism_audit(
    *,
    noise_multiplier: float,
    selection_fraction: float = 0.5,
    threshold: float = 0.0,
    count_clip: float = 1.0,
    clip_norm: float = 1.0,
    delta: float = 1e-5,
    trials: int = 20_000,
    confidence: float = 0.95,
    sampling_rate: float | None = None,
    num_background: int = 7,
    rows: int = 16,
    dim: int = 2,
    seed: int = 0,
    accountant: str = "pld",
    noise_scale_for_testing: float = 1.0,
) -> AuditResult:
  """White-box audit of one sparse step at ``σ_eff = noise_multiplier`` split by ``selection_fraction``.

  Args:
    noise_multiplier: ``σ_eff``, what the ledger records (e.g. the trainer's calibrated σ), > 0.
    selection_fraction: f in (0, 1): ``σ1 = σ_eff / sqrt(f)``, ``σ2 = σ_eff / sqrt(1 - f)``.
    threshold: τ in units of ``σ1 C1``, in [-10, 10] (0: the canary's row passes half the time without it).
    count_clip: C1, > 0.
    clip_norm: C, > 0.
    delta: δ in (0, 1).
    trials: runs per neighbouring input, in [20, 10^7].
    confidence: in [0.5, 1).
    sampling_rate: Poisson rate q in (0, 1], or None for the whole batch.
    num_background: other examples, in [0, 10^3].
    rows: table rows, in [2, 10^3] (row 0 is the canary's).
    dim: row width and dense leaf size, in [1, 64].
    seed: the audit's seed.
    accountant: ``"pld"`` or ``"rdp"`` for the claim.
    noise_scale_for_testing: TEST-ONLY, in [0, 1]: scales ``σ_eff`` handed to the library, not the claim.

  Returns:
    :class:`AuditResult` with ``method="sparse"``; ``details`` holds σ1, σ2, τ and how often the
    canary's row was selected with and without it.
  """
  sigma = validation.check_real("noise_multiplier", noise_multiplier, 0.0, 1e6, lo_open=True)
  f = validation.check_real("selection_fraction", selection_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
  threshold = validation.check_real("threshold", threshold, -10.0, 10.0)
  count_clip = validation.check_real("count_clip", count_clip, 0.0, 1e12, lo_open=True)
  clip_norm = validation.check_real("clip_norm", clip_norm, 0.0, 1e12, lo_open=True)
  delta = validation.check_real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
  trials = validation.check_int("trials", trials, 20, 10**7)
  confidence = validation.check_real("confidence", confidence, 0.5, 1.0, hi_open=True)
  sampling_rate = validation.check_real("sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, optional=True)
  num_background = validation.check_int("num_background", num_background, 0, 10**3)
  rows = validation.check_int("rows", rows, 2, 10**3)
  dim = validation.check_int("dim", dim, 1, 64)
  seed = validation.check_int("seed", seed, 0, 2**31 - 1)
  scale = validation.check_real("noise_scale_for_testing", noise_scale_for_testing, 0.0, 1.0)
  validation.check_choice("accountant", accountant, ("pld", "rdp"))
  ledger_sizes(sampling_rate)

  from dpmega.sparse.selection import split_noise_multiplier  # pylint: disable=import-outside-toplevel

  claimed = claimed_epsilon(noise_multiplier=sigma, delta=delta, sampling_rate=sampling_rate, accountant=accountant)
  exact = gaussian_mechanism_epsilon(sigma, delta, 1.0) if sampling_rate in (None, 1.0) else None
  in_scores, out_scores, rates = _sparse_runs(
      sigma=sigma * scale, selection_fraction=f, threshold=threshold, count_clip=count_clip, clip_norm=clip_norm,
      sampling_rate=sampling_rate, trials=trials, num_background=num_background, rows=rows, dim=dim, seed=seed)
  bound, details = holdout_epsilon_lower_bound(in_scores, out_scores, delta=delta, confidence=confidence, seed=seed)
  sigma1, sigma2 = split_noise_multiplier(sigma, f)
  details.update(score=f"released gradient of the canary's row x B / C when selected, else {_NOT_SELECTED:g}",
                 selection_sigma=sigma1, gradient_sigma=sigma2, selection_fraction=f,
                 threshold_in_sigma1_c1=threshold, count_clip=count_clip,
                 canary_row_selected_in=rates["in"], canary_row_selected_out=rates["out"],
                 num_background=num_background, rows=rows, dim=dim, seed=seed)
  return AuditResult(
      method="sparse", claimed_epsilon=claimed, epsilon_lower_bound=bound, confidence=confidence, delta=delta,
      num_trials=trials, noise_multiplier=sigma, clip_norm=clip_norm, sampling_rate=sampling_rate, steps=1,
      noise_scale_for_testing=scale, accountant=accountant, exact_epsilon=exact, details=details)
