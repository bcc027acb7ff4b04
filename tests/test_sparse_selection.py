"""The private row selection (dpmega/sparse/selection.py): clipped counts, the noisy threshold's law, the cap."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpmega import sparse
from dpmega.sparse import selection as sel


def _per_example(ids, rows, clip):
  """Each example's own contribution: the counts of a batch of that example alone."""
  b = ids[0].shape[0]
  f = jax.jit(lambda x: sel.clipped_row_counts(x, jnp.ones(1), rows, clip))
  out = []
  for i in range(b):
    one = f([x[i:i + 1] for x in ids])
    out.append(np.concatenate([np.asarray(c, np.float64) for c in one]))
  return np.stack(out)


# ----------------------------------------------------------------------------- clipped counts


@pytest.mark.parametrize("clip", [1.0, 0.3, 7.0])
def test_each_example_count_contribution_norm_at_most_count_clip(clip):
  rng = np.random.default_rng(0)
  rows = (1000, 40)
  many = rng.permutation(1000)[:900]  # an example touching 900 rows
  dup = np.full(900, 17)  # one row, 900 times
  half_dup = np.concatenate([np.arange(450), np.arange(450)])
  t0 = np.stack([many, dup, half_dup, rng.integers(0, 1000, 900)]).astype(np.int32)
  t1 = np.stack([rng.integers(0, 40, 5), np.full(5, 3), np.arange(5), np.array([1, 1, 2, 2, 39])]).astype(np.int32)
  ids = [jnp.asarray(t0), jnp.asarray(t1)]
  per = _per_example(ids, rows, clip)
  norms = np.linalg.norm(per, axis=1)
  assert np.all(norms <= clip), norms
  # The batch's counts are the sum of the examples' contributions: nothing else enters.
  batch = np.concatenate([np.asarray(c) for c in sel.clipped_row_counts(ids, jnp.ones(4), rows, clip)])
  np.testing.assert_allclose(batch, per.sum(0), rtol=1e-6, atol=1e-7)
  # Duplicates count once: example 1 touches 2 distinct rows (17 in t0, 3 in t1), weight min(1, clip/sqrt(2)).
  w = min(1.0, clip / math.sqrt(2))
  assert per[1, 17] == pytest.approx(w, rel=1e-5) and per[1, 1000 + 3] == pytest.approx(w, rel=1e-5)
  assert np.count_nonzero(per[1]) == 2
  # Example 2 touches 450 + 5 distinct rows, each at the same weight.
  assert np.count_nonzero(per[2]) == 455
  np.testing.assert_allclose(per[2][per[2] > 0], min(1.0, clip / math.sqrt(455)), rtol=1e-5)


def test_row_touched_by_exactly_one_example_holds_its_weight_only():
  ids = [jnp.array([[5, 6, 6], [6, 7, 8], [6, 6, 6]])]
  c = np.asarray(sel.clipped_row_counts(ids, jnp.ones(3), [10], 1.0)[0])
  assert c[5] == pytest.approx(1 / math.sqrt(2), rel=1e-5)  # only example 0 touches row 5
  assert c[6] == pytest.approx(1 / math.sqrt(2) + 1 / math.sqrt(3) + 1.0, rel=1e-5)
  assert c[0] == c[9] == 0.0


def test_masked_examples_and_out_of_range_ids_add_nothing():
  ids = [jnp.array([[1, 2], [3, -1], [99, 4]])]
  c = np.asarray(sel.clipped_row_counts(ids, jnp.array([0.0, 1.0, 1.0]), [5], 1.0)[0])
  assert c[1] == c[2] == 0.0  # masked
  assert c[3] == pytest.approx(1.0, rel=1e-5)  # -1 is not a row: one distinct row
  assert c[4] == pytest.approx(1.0, rel=1e-5)  # 99 is not a row
  assert c.sum() == pytest.approx(2.0, rel=1e-5)


def test_bad_count_clip_is_refused_naming_the_field():
  with pytest.raises(ValueError, match="count_clip must be"):
    sel.clipped_row_counts([jnp.zeros((1, 1), jnp.int32)], jnp.ones(1), [2], 0.0)
  with pytest.raises(ValueError, match="selection_fraction must be"):
    sel.SelectionConfig(selection_fraction=1.0)
  with pytest.raises(ValueError, match="max_rows must be"):
    sel.SelectionConfig(max_rows=0)


# ----------------------------------------------------------------------------- accounting


def test_effective_sigma_is_the_one_gaussian_of_the_concatenated_release():
  s1, s2 = sparse.split_noise_multiplier(0.8, 0.25)
  assert sparse.effective_noise_multiplier(s1, s2) == pytest.approx(0.8, rel=1e-12)
  # Unit-noise sensitivity of (counts / (s1 C1), grad / (s2 C)) for an example at both bounds.
  assert math.hypot(1 / s1, 1 / s2) == pytest.approx(1 / 0.8, rel=1e-12)
  assert s1 > 0.8 and s2 > 0.8


# ----------------------------------------------------------------------------- the selection's law

R = 40
COUNTS = np.zeros(R, np.float32)
COUNTS[[3, 10, 11, 30]] = [0.5, 1.5, 3.0, 0.2]
STD, TAU = 1.0, 1.6


N_DRAWS = 8000


@functools.lru_cache(maxsize=None)
def _draws(*, max_touched, max_rows=R, counts=tuple(COUNTS.tolist()), tau=TAU, std=STD):
  """N_DRAWS selections with independent keys (cached: several tests read the same law)."""
  keys = jax.random.split(jax.random.key(1234 + max_touched + max_rows), N_DRAWS)
  c = jnp.asarray(counts, jnp.float32)
  f = jax.jit(jax.vmap(lambda k: sel.select_rows(c, k, noise_std=std, threshold=tau, max_rows=max_rows,
                                                 max_touched=max_touched)))
  s = f(keys)
  return np.asarray(s.ids), np.asarray(s.valid), np.asarray(s.num_selected)


def _indicator(ids, valid):
  out = np.zeros((ids.shape[0], R + 1), bool)
  np.put_along_axis(out, np.where(valid, ids, R), True, axis=1)
  return out[:, :R]


@pytest.mark.parametrize("max_touched", [8, 2])  # 8 >= 4 touched: fast branch; 2: the dense branch
def test_each_row_selected_with_the_gaussian_threshold_probability(max_touched):
  n = N_DRAWS
  ids, valid, num = _draws(max_touched=max_touched)
  sel_ind = _indicator(ids, valid)
  p = stats.norm.sf((TAU - COUNTS) / STD)
  freq = sel_ind.mean(0)
  tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-9
  assert np.all(np.abs(freq - p) <= tol), np.abs(freq - p) / tol
  # Rows are selected independently: the number of selected zero rows is Binomial(36, p0).
  zero = np.setdiff1d(np.arange(R), [3, 10, 11, 30])
  m = sel_ind[:, zero].sum(1)
  p0 = stats.norm.sf(TAU / STD)
  assert m.mean() == pytest.approx(36 * p0, abs=5 * np.sqrt(36 * p0 * (1 - p0) / n))
  assert m.var() == pytest.approx(36 * p0 * (1 - p0), rel=0.1)
  # Pairs of rows: independence (a touched and a zero row; two zero rows).
  for a, b in ((11, 0), (1, 2)):
    joint = (sel_ind[:, a] & sel_ind[:, b]).mean()
    assert joint == pytest.approx(p[a] * p[b], abs=5 * np.sqrt(p[a] * p[b] / n) + 1e-4)
  np.testing.assert_array_equal(num, sel_ind.sum(1))  # no cap binds at K = R


def test_fast_and_dense_branches_have_the_same_law_of_the_number_selected():
  _, _, fast = _draws(max_touched=8)
  _, _, dense = _draws(max_touched=2)
  assert stats.ks_2samp(fast, dense).pvalue > 1e-4


def test_ids_are_distinct_and_padded_with_the_row_count():
  for mt, k in ((8, R), (8, 5), (2, 5)):
    ids, valid, num = _draws(max_touched=mt, max_rows=k) if k == R else _draws(
        max_touched=mt, max_rows=k, counts=tuple(np.where(np.arange(R) < 4, 50.0, 0.0).tolist()), tau=-20.0)
    for i, v in zip(ids, valid):
      kept = i[v]
      assert len(np.unique(kept)) == len(kept) and np.all(kept < R) and np.all(i[~v] == R)
      assert np.all(v[:len(kept)])
    np.testing.assert_array_equal(valid.sum(1), np.minimum(num, k))


@pytest.mark.parametrize("max_touched", [8, 2])
def test_cap_keeps_a_uniform_subset_of_the_selected_rows(max_touched):
  # tau far below the noise: every row is selected (touched or not); K = 5 of 40 kept, each with prob 1/8.
  n, k = N_DRAWS, 5
  counts = np.zeros(R, np.float32)
  counts[:4] = 50.0  # touched rows, certainly selected: a touched-first rule would keep only them
  ids, valid, num = _draws(max_touched=max_touched, max_rows=k, counts=tuple(counts.tolist()), tau=-20.0)
  assert np.all(num == R) and np.all(valid.sum(1) == k)
  freq = _indicator(ids, valid).mean(0)
  tol = 5 * math.sqrt((k / R) * (1 - k / R) / n)
  assert np.all(np.abs(freq - k / R) <= tol), freq


def test_rows_far_above_the_threshold_are_always_kept_and_untouched_rows_never_at_high_threshold():
  counts = np.zeros(1000, np.float32)
  counts[[7, 700]] = 100.0
  f = jax.jit(functools.partial(sel.select_rows, noise_std=1.0, threshold=10.0, max_rows=4, max_touched=16))
  s = f(jnp.asarray(counts), jax.random.key(0))
  assert sorted(np.asarray(s.ids).tolist()) == [7, 700, 1000, 1000] and int(s.num_selected) == 2
