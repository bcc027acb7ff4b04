"""Samplers: real Poisson sampling, fixed-size sampling, exact resume, fixed-shape padded chunks."""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from dpmega import noise
from dpmega import sampling
from dpmega.sampling import SamplingScheme
from dpmega.data.sources import ArraySource
from dpmega.noise import insecure_secret_from_seed as _secret  # fixed secrets: reproducible test draws


def _draws(sampler, batch_size, steps):
  return [sampler.indices_at(t, batch_size) for t in range(steps)]


def test_poisson_each_example_included_with_probability_q():
  n, b, steps = 400, 40, 3000  # q = 0.1
  draws = _draws(sampling.PoissonSampler(n, secret=_secret(1)), b, steps)
  counts = np.zeros(n)
  for idx in draws:
    counts[idx] += 1
  q = b / n
  # Each example's count is Binomial(steps, q): all within 6 standard deviations.
  sd = math.sqrt(steps * q * (1 - q))
  assert np.abs(counts - steps * q).max() < 6 * sd
  assert abs(counts.sum() / (n * steps) - q) < 6 * sd / (steps * math.sqrt(n))


def test_poisson_batch_size_is_binomial_not_fixed():
  n, b, steps = 1000, 100, 3000
  sizes = np.array([len(i) for i in _draws(sampling.PoissonSampler(n, secret=_secret(2)), b, steps)])
  q = b / n
  mean, var = n * q, n * q * (1 - q)  # 100, 90
  assert abs(sizes.mean() - mean) < 6 * math.sqrt(var / steps)
  # Sample variance of a Binomial: within a generous band around n q (1 - q), far from 0.
  assert 0.8 * var < sizes.var() < 1.2 * var


def test_poisson_inclusions_are_independent_between_examples():
  n, b, steps = 200, 100, 4000  # q = 0.5: without replacement would anti-correlate
  draws = _draws(sampling.PoissonSampler(n, secret=_secret(3)), b, steps)
  both = sum(1 for idx in draws if 0 in idx and 1 in idx) / steps
  sd = math.sqrt(0.25 * 0.75 / steps)
  assert abs(both - 0.25) < 6 * sd


def test_indices_are_sorted_distinct_and_in_range():
  for s in (sampling.PoissonSampler(5000, secret=_secret(0)),
            sampling.WithoutReplacementSampler(5000, secret=_secret(0))):
    idx = s.indices_at(7, 1234)
    assert idx.dtype == np.int64
    assert (np.diff(idx) > 0).all() and idx.min() >= 0 and idx.max() < 5000


def test_without_replacement_draws_exactly_b_distinct_uniformly():
  n, b, steps = 300, 60, 2000
  s = sampling.WithoutReplacementSampler(n, secret=_secret(4))
  counts = np.zeros(n)
  for idx in _draws(s, b, steps):
    assert len(idx) == b and len(np.unique(idx)) == b
    counts[idx] += 1
  q = b / n
  assert np.abs(counts - steps * q).max() < 6 * math.sqrt(steps * q * (1 - q))
  assert s.scheme == SamplingScheme.WITHOUT_REPLACEMENT


def test_large_dataset_is_sampled_without_per_example_work():
  # N = 10^9 would need gigabytes if done per example; the binomial + subset draw is O(b).
  idx = sampling.PoissonSampler(10**9, secret=_secret(0)).indices_at(0, 20_000)
  assert abs(len(idx) - 20_000) < 6 * math.sqrt(20_000)
  assert len(np.unique(idx)) == len(idx)


def test_q_equal_one_takes_every_example():
  np.testing.assert_array_equal(sampling.PoissonSampler(50, secret=_secret(0)).indices_at(3, 50), np.arange(50))


@pytest.mark.parametrize("bad", [0, -1, 101, 2.5, True])
def test_batch_size_out_of_range_is_an_error_naming_it(bad):
  with pytest.raises(ValueError, match="batch_size"):
    sampling.PoissonSampler(100, secret=_secret(0)).sample(bad)


@pytest.mark.parametrize("kwargs, field", [({"dataset_size": 0}, "dataset_size"),
                                           ({"dataset_size": 10, "secret": b"16 bytes needed"}, "secret"),
                                           ({"dataset_size": 10, "secret": 7}, "secret"),
                                           ({"dataset_size": 10, "generation": -1}, "generation")])
def test_bad_sampler_arguments_are_named(kwargs, field):
  with pytest.raises(ValueError, match=field):
    sampling.PoissonSampler(**kwargs)


def test_draw_is_a_pure_function_of_secret_and_step():
  a, b = sampling.PoissonSampler(1000, secret=_secret(9)), sampling.PoissonSampler(1000, secret=_secret(9))
  np.testing.assert_array_equal(a.indices_at(5, 100), b.indices_at(5, 100))
  assert not np.array_equal(a.indices_at(5, 100), a.indices_at(6, 100))
  other = sampling.PoissonSampler(1000, secret=_secret(10))
  assert not np.array_equal(a.indices_at(5, 100), other.indices_at(5, 100))
  assert not np.array_equal(a.indices_at(5, 100), sampling.PoissonSampler(1000, secret=_secret(9),
                                                                          generation=1).indices_at(5, 100))


@pytest.mark.parametrize("scheme", list(SamplingScheme))
def test_restored_sampler_continues_exactly(scheme):
  sizes = [10, 50, 20, 80, 30, 30, 60]
  full = sampling.make_sampler(scheme, 500, secret=_secret(3))
  want = [full.sample(b) for b in sizes]
  first = sampling.make_sampler(scheme, 500, secret=_secret(3))
  got = [first.sample(b) for b in sizes[:3]]
  state = sampling.SamplerState.from_dict(first.state.to_dict())  # through JSON-able form
  second = sampling.make_sampler(scheme, 500, secret=_secret(3))
  second.restore(state)
  got += [second.sample(b) for b in sizes[3:]]
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)
  assert second.position == len(sizes)


def test_restore_refuses_another_runs_state():
  state = sampling.PoissonSampler(500, secret=_secret(3), position=4).state
  with pytest.raises(ValueError, match="sampler state"):
    sampling.PoissonSampler(501, secret=_secret(3)).restore(state)
  with pytest.raises(ValueError, match="sampler state"):
    sampling.WithoutReplacementSampler(500, secret=_secret(3)).restore(state)


def test_make_sampler_rejects_unknown_scheme():
  with pytest.raises(ValueError, match="poisson"):
    sampling.make_sampler("shuffle", 10)


@pytest.mark.parametrize("m, k", [(1, 1), (4, 1), (8, 16), (32, 5), (128, 16)])
def test_chunks_cover_the_batch_with_few_fixed_shapes(m, k):
  shapes = sampling.chunk_shapes(m, k)
  assert len(shapes) <= 2 + math.log2(k)
  for b in list(range(0, 3 * m * k + 2)) + [10_007]:
    sizes = sampling.chunk_sizes(b, microbatch_size=m, max_microbatches=k)
    assert all(s in shapes and s % m == 0 for s in sizes)
    total = sum(sizes)
    assert b <= total < b + max(m, b - (b // (m * k)) * m * k) + 1
    if b:
      # Padding is less than half the last chunk (rounded to powers of two micro-batches) or < m.
      assert total - b < max(m, sizes[-1] / 2 + 1)


def test_iterate_chunks_yields_exactly_the_sampled_rows_then_masked_padding(tmp_path):
  n = 1000
  x = np.lib.format.open_memmap(str(tmp_path / "x.npy"), mode="w+", dtype=np.float32, shape=(n, 3))
  x[:] = np.arange(3 * n, dtype=np.float32).reshape(n, 3)
  x.flush()
  source = ArraySource({"x": np.load(str(tmp_path / "x.npy"), mmap_mode="r"), "y": np.arange(n)})
  idx = sampling.PoissonSampler(n, secret=_secret(0)).indices_at(0, 300)
  chunks = list(sampling.iterate_chunks(source, idx, microbatch_size=16, max_microbatches=8))
  assert sum(c.num_real for c in chunks) == len(idx)
  real_y = np.concatenate([c.batch["y"][:c.num_real] for c in chunks])
  np.testing.assert_array_equal(real_y, idx)
  for c in chunks:
    size = len(c.mask)
    assert c.batch["x"].shape == (size, 3) and c.batch["y"].shape == (size,)
    assert c.mask.dtype == np.float32
    np.testing.assert_array_equal(c.mask, (np.arange(size) < c.num_real).astype(np.float32))
    np.testing.assert_array_equal(c.batch["x"][:c.num_real], np.asarray(x)[c.batch["y"][:c.num_real]])


def test_empty_batch_has_no_chunks():
  source = ArraySource({"x": np.zeros((5, 2))})
  assert list(sampling.iterate_chunks(source, np.zeros((0,), np.int64), microbatch_size=4,
                                      max_microbatches=2)) == []


def test_tfds_random_access_source_is_sampled_like_arrays():
  tfds = pytest.importorskip("tensorflow_datasets")
  from dpmega.data.tfds_source import TfdsSource

  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    source = TfdsSource(tfds.data_source("mnist", split="train"))
    assert len(source) == 64
    idx = sampling.PoissonSampler(len(source), secret=_secret(0)).indices_at(0, 20)
    chunks = list(sampling.iterate_chunks(source, idx, microbatch_size=4, max_microbatches=2))
    assert sum(c.num_real for c in chunks) == len(idx)
    for c in chunks:
      assert c.batch["image"].shape == (len(c.mask), 28, 28, 1)
      assert c.batch["label"].shape == (len(c.mask),)
    again = source.take(idx[:3])
    np.testing.assert_array_equal(again["image"], chunks[0].batch["image"][:3])


# ----------------------------------------------------------------------------- one chunker, many processes


@given(b=st.integers(0, 300), processes=st.integers(1, 5), rows_multiple=st.sampled_from([1, 2, 4, 6]),
       k=st.integers(1, 5))
def test_process_shares_tile_the_global_sample_exactly(b, processes, rows_multiple, k):
  rng = np.random.default_rng(b)
  global_indices = np.sort(rng.choice(10_000, size=b, replace=False)).astype(np.int64)
  shares = [sampling.chunk_indices(global_indices, microbatch_size=rows_multiple, max_microbatches=k,
                                   process_index=p, process_count=processes) for p in range(processes)]
  # Same number of chunks, same shapes, on every process.
  shapes = {tuple(len(c.indices) for c in chunks) for chunks in shares}
  assert len(shapes) == 1
  assert all(size % rows_multiple == 0 for size in shapes.pop())
  real = []
  for chunks in shares:
    for c in chunks:
      assert c.mask.dtype == np.float32 and len(c.mask) == len(c.indices)
      assert np.all(c.mask[:c.num_real] == 1) and np.all(c.mask[c.num_real:] == 0)
      assert np.all(c.indices[c.num_real:] == global_indices[0])  # the one fill rule
      real.append(c.indices[:c.num_real])
  real = np.concatenate(real) if real else np.zeros((0,), np.int64)
  np.testing.assert_array_equal(real, global_indices)  # each once, none dropped, in order
  if b == 0:
    assert all(chunks == () for chunks in shares)


def test_one_process_is_the_one_process_case_of_the_chunker():
  idx = sampling.PoissonSampler(1000, secret=_secret(0)).indices_at(0, 300)
  alone = sampling.chunk_indices(idx, microbatch_size=16, max_microbatches=8)
  same = sampling.chunk_indices(idx, microbatch_size=16, max_microbatches=8, process_index=0, process_count=1)
  assert [len(c.indices) for c in alone] == list(sampling.chunk_sizes(len(idx), microbatch_size=16,
                                                                     max_microbatches=8))
  for a, b in zip(alone, same, strict=True):
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_union_of_the_process_shares_is_the_samplers_batch():
  secret = noise.secret_bytes()
  for step in range(3):
    want = sampling.PoissonSampler(1000, secret=secret).indices_at(step, 100)
    # Each process draws the global sample itself, from the shared secret, and keeps its share.
    got = np.concatenate([
        c.indices[:c.num_real]
        for p in range(3)
        for c in sampling.chunk_indices(sampling.PoissonSampler(1000, secret=secret).indices_at(step, 100),
                                        microbatch_size=4, max_microbatches=8, process_index=p, process_count=3)])
    np.testing.assert_array_equal(got, want)


def test_fewer_sampled_rows_than_processes_pads_with_masked_rows():
  shares = [sampling.chunk_indices(np.array([5, 9]), microbatch_size=2, max_microbatches=2, process_index=p,
                                   process_count=4) for p in range(4)]
  assert [len(s) for s in shares] == [1, 1, 1, 1]
  assert [s[0].num_real for s in shares] == [1, 1, 0, 0]
  assert all(len(s[0].indices) == 2 for s in shares)
  assert shares[3][0].mask.sum() == 0
  assert shares[3][0].indices.tolist() == [5, 5]  # padding repeats the step's first sampled index


def test_chunker_validates_arguments():
  with pytest.raises(ValueError, match="process_index must be an int in \\[0, 1\\]"):
    sampling.process_slice(10, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="process_count must be an int in \\[1, inf\\]"):
    sampling.process_slice(10, process_index=0, process_count=0)
  with pytest.raises(ValueError, match="microbatch_size must be an int in \\[1, inf\\]"):
    sampling.chunk_indices(np.arange(4), microbatch_size=0, max_microbatches=1)
  with pytest.raises(ValueError, match="max_microbatches must be an int in \\[1, inf\\]"):
    sampling.chunk_indices(np.arange(4), microbatch_size=1, max_microbatches=0)
  with pytest.raises(ValueError, match="indices must be a 1-D int array"):
    sampling.chunk_indices(np.zeros((2, 2), np.int64), microbatch_size=1, max_microbatches=1)
