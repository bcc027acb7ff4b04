"""The sparse private step (make_update_fn with sparse tables; dpmega/sparse/{noisy_update,counts}.py).

The 8-device check runs this file as a script in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX fixes its device
count at start-up).
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpmega import clipping
from dpmega import noise
from dpmega import sampling
from dpmega import sharding
from dpmega import sparse
from dpmega.train import step as step_lib

R, D, N_IDS = 512, 4, 3
TABLE = ("emb", "table")


def _params():
  return {"emb": {"table": 0.1 * jax.random.normal(jax.random.key(0), (R, D))}, "w": jnp.ones((D,))}


def _loss(params, ex):
  h = jnp.sum(params["emb"]["table"][ex["ids"]], axis=0)
  return jnp.tanh(jnp.dot(h, params["w"]) + ex["y"]) ** 2


def _batch(seed, b=16):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 40, (b, N_IDS)).astype(np.int32)  # rows 0..39 only: the rest stay zero-count
  ids[0] = [7, 7, 7]  # duplicates
  return {"ids": ids, "y": rng.normal(size=b).astype(np.float32)}


def _spec(max_rows=64, max_touched=64, threshold=1.0):
  return sparse.SparseTables((TABLE,), sparse.SelectionConfig(count_clip=1.0, threshold=threshold,
                                                              max_rows=max_rows, max_touched=max_touched))


def _build(mesh, optimizer, spec, params, *, microbatch_size):
  ps = step_lib.make_private_step(_loss, optimizer, mesh, params, clip_norm=1.0, microbatch_size=microbatch_size,
                                  max_microbatches=4, min_shard_size=1)  # the table sharded by rows on fsdp
  update = step_lib.make_update_fn(optimizer, mesh, ps.param_shardings, ps.opt_shardings, clip_norm=1.0,
                                   sparse=spec)
  count = sparse.make_count_fn(lambda b: [b["ids"]], {TABLE: R}, mesh, count_clip=spec.selection.count_clip)
  return ps, update, count


def run_steps(mesh_config, steps=3, compact=True):
  """Three sparse private steps (two chunks each) from a fixed insecure secret: the final params, as numpy.

  ``compact``: the counts' layout (:func:`dpmega.sparse.zero_counts`); the chunks touch 40 rows, T = 64.
  """
  mesh = sharding.make_mesh(mesh_config)
  opt = optax.adam(0.05)
  params = _params()
  spec = _spec()
  ps, update, count = _build(mesh, opt, spec, params, microbatch_size=2)
  state = ps.shard_state(step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params)))
  secret = noise.insecure_secret_from_seed(7)
  metrics = []
  for t in range(steps):  # the trainer's path: the first chunk starts the sum, the second is added in place
    counts = sharding.shard(sparse.zero_counts({TABLE: R}, spec.selection.max_touched, compact=compact),
                            sharding.replicated(mesh))
    chunks = [sampling.Chunk(_batch(10 * t + c), np.ones(16, np.float32), 16) for c in range(2)]
    acc, counts = ps.clipped_sum_with_counts(state.params, chunks, count, counts)
    assert isinstance(counts[TABLE], sparse.TouchedRowCounts) == compact
    state, m = update(state, acc.grad_sum, noise.step_key(secret, t), 0.7, 32.0, row_counts=counts)
    metrics.append({k: float(v) for k, v in m.items()})
  host = sharding.to_host(state.params)
  spec = ps.param_shardings["emb"]["table"].spec
  rows_sharded = np.int32(len(spec) > 0 and spec[0] is not None)
  return {"table": np.asarray(host["emb"]["table"]), "w": np.asarray(host["w"]), "rows_sharded": rows_sharded}, metrics


# ----------------------------------------------------------------------------- the release


def _uint32_sizes(jaxpr, out):
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      aval = getattr(v, "aval", None)
      if aval is not None and getattr(aval, "dtype", None) == jnp.uint32:
        out.append(int(np.prod(aval.shape)))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _uint32_sizes(inner, out)
  return out


def test_no_table_sized_noise_draw_in_the_sparse_update():
  rows, d = 4096, 8
  params = {"emb": {"table": jnp.zeros((rows, d))}, "w": jnp.ones((d,))}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  opt = optax.sgd(0.1)
  shard = sharding.param_shardings(jax.eval_shape(lambda p: p, params), mesh=mesh)
  opt_shard = sharding.param_shardings(jax.eval_shape(opt.init, params), mesh=mesh)
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
  key = noise.step_key(noise.insecure_secret_from_seed(0), 0)
  sizes = {}
  for name, spec in (("sparse", _spec(max_rows=64, max_touched=64)), ("dense", None)):
    update = step_lib.make_update_fn(opt, mesh, shard, opt_shard, clip_norm=1.0, sparse=spec)
    counts = None if spec is None else sparse.zero_counts({TABLE: rows}, 64)
    jaxpr = jax.make_jaxpr(update.jitted)(state, params, key, 1.0, 8.0, 0, counts)
    sizes[name] = max(_uint32_sizes(jaxpr.jaxpr, []))
  assert sizes["dense"] >= rows * d  # the check sees a table-sized draw when there is one
  assert sizes["sparse"] <= rows  # at most one scalar per row (the dense-selection branch), never rows x dim


def test_no_table_sized_buffer_in_the_accumulation():
  """The chunk's clipped table gradient goes straight into the (donated) sum: no [R, d] temp, no accumulator copy."""
  rows, d, b = 1 << 16, 16, 32
  params = {"emb": {"table": jnp.zeros((rows, d))}, "w": jnp.ones((d,))}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  ps = step_lib.make_private_step(_loss, optax.sgd(0.1), mesh, params, clip_norm=1.0, microbatch_size=b,
                                  max_microbatches=1)
  batch, mask = {"ids": np.zeros((b, N_IDS), np.int32), "y": np.zeros((b,), np.float32)}, np.ones((b,), np.float32)
  table = rows * d * 4
  more = ps.accumulate.in_place_jitted.lower(params, ps.zero_accumulator(params), batch,
                                             mask).compile().memory_analysis()
  if more is None:
    pytest.skip("this backend reports no memory analysis")
  # Later chunks: the sum is donated (aliased to the output) and the chunk adds to it in place.
  assert more.alias_size_in_bytes >= table and more.temp_size_in_bytes < 0.1 * table, more
  # The first chunk: no accumulator argument; its one table-sized buffer is the output sum itself.
  first = ps.accumulate.start_jitted.lower(params, batch, mask).compile().memory_analysis()
  assert first.argument_size_in_bytes < 1.1 * table and first.temp_size_in_bytes < 0.1 * table, first


def test_shard_state_owns_its_buffers_so_the_donating_update_reuses_them():
  """On CPU a view of the caller's buffers cannot be donated: the first sparse update would copy the state."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  params, opt = _params(), optax.sgd(0.1)
  ps = step_lib.make_private_step(_loss, opt, mesh, params, clip_norm=1.0, microbatch_size=4, max_microbatches=1)
  s0 = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
  s1 = ps.shard_state(s0)
  for a, b in zip(jax.tree_util.tree_leaves(s0), jax.tree_util.tree_leaves(s1)):
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  s2 = ps.shard_state(s0, donate=True)  # the caller gives s0 up: its arrays are freed as they are copied
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(s0))
  np.testing.assert_array_equal(np.asarray(s2.params["emb"]["table"]), np.asarray(s1.params["emb"]["table"]))


def test_clipped_sum_over_chunks_equals_the_whole_batch_and_leaves_untouched_rows_zero():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  params = _params()
  ps, _, count = _build(mesh, optax.sgd(0.1), _spec(), params, microbatch_size=4)
  whole = {k: np.concatenate([_batch(s)[k] for s in (1, 2, 3)]) for k in ("ids", "y")}
  mask = np.ones(48, np.float32)
  mask[5] = 0  # a padding row: contributes nothing
  ref, _, ref_stats = clipping.clipped_grad_sum(_loss, params, whole, mask, clip_norm=1.0)
  for n_chunks in (1, 3):
    size = 48 // n_chunks
    chunks = [sampling.Chunk({k: v[i * size:(i + 1) * size] for k, v in whole.items()},
                             mask[i * size:(i + 1) * size], size) for i in range(n_chunks)]
    counts = sparse.zero_counts({TABLE: R}, 64)
    acc, counts = ps.clipped_sum_with_counts(ps.shard_state(step_lib.TrainState(
        jnp.zeros((), jnp.int32), params, optax.sgd(0.1).init(params))).params, chunks, count, counts)
    got = np.asarray(acc.grad_sum["emb"]["table"])
    np.testing.assert_allclose(got, np.asarray(ref["emb"]["table"]), rtol=1e-5, atol=1e-7, err_msg=str(n_chunks))
    np.testing.assert_allclose(np.asarray(acc.grad_sum["w"]), np.asarray(ref["w"]), rtol=1e-5, atol=1e-6)
    assert np.all(got[40:] == 0)  # rows no example touched: exactly zero
    assert int(acc.stats.num_examples) == int(ref_stats.num_examples) == 47
    assert int(counts[TABLE].num_touched) == len(np.unique(whole["ids"][mask > 0]))


def test_unselected_rows_unchanged_selected_rows_get_gradient_noise_sigma2():
  rows, d, k = 4096, 8, 512
  params = {"emb": {"table": jnp.zeros((rows, d))}, "w": jnp.zeros((d,))}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  opt = optax.sgd(1.0)
  shard = sharding.param_shardings(jax.eval_shape(lambda p: p, params), mesh=mesh)
  opt_shard = sharding.param_shardings(jax.eval_shape(opt.init, params), mesh=mesh)
  spec = _spec(max_rows=k, max_touched=k, threshold=60.0)
  update = step_lib.make_update_fn(opt, mesh, shard, opt_shard, clip_norm=1.0, sparse=spec)
  selected = np.arange(0, 2 * k, 2)
  counts = sparse.RowCounts(jnp.zeros((rows,)).at[selected].set(200.0),  # k rows far above tau; tau >> noise
                            jnp.asarray(selected, jnp.int32), jnp.int32(k))
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  key = noise.step_key(noise.insecure_secret_from_seed(3), 0)
  state, m = update(state, grads, key, 1.0, 1.0, row_counts={TABLE: counts})
  table = np.asarray(state.params["emb"]["table"])
  others = np.setdiff1d(np.arange(rows), selected)
  assert np.all(table[others] == 0.0)
  sigma2 = sparse.split_noise_multiplier(1.0, 0.5)[1]
  assert np.std(table[selected]) == pytest.approx(sigma2, rel=0.05)  # sgd(1), B = 1: minus the noise
  assert m["selected_rows"] == k and m["update_sparsity"] == pytest.approx(k / rows)
  assert m["selection_cap_hit"] == 0.0 and m["gradient_sigma"] == pytest.approx(sigma2)


def test_tables_that_share_a_selection_update_exactly_the_same_rows():
  rows, d, k = 1024, 4, 64
  lin = ("lin", "table")
  params = {"emb": {"table": jnp.zeros((rows, d))}, "lin": {"table": jnp.zeros((rows, 1))}, "w": jnp.zeros((d,))}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  opt = optax.sgd(1.0)
  shard = sharding.param_shardings(jax.eval_shape(lambda p: p, params), mesh=mesh)
  opt_shard = sharding.param_shardings(jax.eval_shape(opt.init, params), mesh=mesh)
  spec = sparse.SparseTables((TABLE, lin), sparse.SelectionConfig(count_clip=1.0, threshold=0.5, max_rows=4 * k,
                                                                  max_touched=4 * k), shared=((lin, TABLE),))
  assert spec.groups() == ((TABLE, lin),)  # keyed by the first table in table order
  update = step_lib.make_update_fn(opt, mesh, shard, opt_shard, clip_norm=1.0, sparse=spec)
  touched = np.arange(0, 2 * k, 2)
  counts = sparse.RowCounts(jnp.zeros((rows,)).at[touched].set(1.0),
                            jnp.full((4 * k,), rows, jnp.int32).at[:k].set(touched), jnp.int32(k))
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  key = noise.step_key(noise.insecure_secret_from_seed(4), 0)
  state, m = update(state, grads, key, 1.0, 1.0, row_counts={TABLE: counts})
  moved_emb = np.flatnonzero(np.any(np.asarray(state.params["emb"]["table"]) != 0, axis=1))
  moved_lin = np.flatnonzero(np.any(np.asarray(state.params["lin"]["table"]) != 0, axis=1))
  np.testing.assert_array_equal(moved_emb, moved_lin)  # one selection, both tables
  # sigma1 = sqrt(2), tau = 0.5: the touched rows (count 1) and some untouched ones pass, by noise.
  assert 0 < len(moved_emb) < rows and 0 < len(np.intersect1d(moved_emb, touched)) < k
  assert m["selected_rows"] == 2 * len(moved_emb)
  assert m["update_sparsity"] == pytest.approx(len(moved_emb) / rows)  # kept rows / rows of both tables
  # The counts are keyed by the group's first table only; a group's tables must have its counts' rows.
  with pytest.raises(ValueError, match="counts must be keyed by the first table of each selection"):
    update(state, grads, key, 1.0, 1.0, row_counts={TABLE: counts, lin: counts})
  short = sparse.RowCounts(jnp.zeros((rows // 2,)), jnp.full((4 * k,), rows // 2, jnp.int32), jnp.int32(0))
  with pytest.raises(ValueError, match="have not the 512 rows"):
    sparse.sparse_privatize(grads, {TABLE: short}, key, spec=spec, noise_multiplier=1.0, clip_norm=1.0,
                            expected_batch_size=1.0)


@pytest.mark.parametrize("shared, message", [
    (((TABLE,),), "at least two tables"),
    (((TABLE, ("nope",)),), "not one of tables"),
    (((TABLE, ("lin",)), (TABLE, ("x",))), "in two groups"),
])
def test_bad_shared_groups_are_refused(shared, message):
  with pytest.raises(ValueError, match=message):
    sparse.SparseTables((TABLE, ("lin",), ("x",)), shared=shared)


def test_update_refuses_row_counts_exactly_when_not_sparse():
  params = {"emb": {"table": jnp.zeros((8, 2))}, "w": jnp.zeros((2,))}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  opt = optax.sgd(1.0)
  shard = sharding.param_shardings(jax.eval_shape(lambda p: p, params), mesh=mesh)
  opt_shard = sharding.param_shardings(jax.eval_shape(opt.init, params), mesh=mesh)
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
  key = noise.step_key(noise.insecure_secret_from_seed(3), 0)
  upd = step_lib.make_update_fn(opt, mesh, shard, opt_shard, clip_norm=1.0, sparse=_spec())
  with pytest.raises(ValueError, match="row_counts must be given"):
    upd(state, params, key, 1.0, 1.0)
  dense = step_lib.make_update_fn(opt, mesh, shard, opt_shard, clip_norm=1.0)
  with pytest.raises(ValueError, match="row_counts must be given"):
    dense(state, params, key, 1.0, 1.0, row_counts=sparse.zero_counts({TABLE: 8}, 8))


def _dense_view(rc, rows=R):
  return sparse.to_dense(rc, rows) if isinstance(rc, sparse.TouchedRowCounts) else rc


@pytest.mark.parametrize("compact", [False, True])
def test_counts_accumulated_over_chunks_equal_the_whole_batch_counts(compact):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  count = sparse.make_count_fn(lambda b: [b["ids"]], {TABLE: R}, mesh, count_clip=1.0)
  b = _batch(0, 32)
  mask = np.ones(32, np.float32)
  mask[5] = 0.0  # a padding row: its ids touch nothing
  b["ids"][5] = [300, 301, 302]
  b["ids"][6] = [-1, R, 9]  # out of range: touch nothing; example 6 reaches row 9 only, with weight 1
  whole = count(sparse.zero_counts({TABLE: R}, 64, compact=compact), b, mask)[TABLE]
  halves = sparse.zero_counts({TABLE: R}, 64, compact=compact)
  for sl in (slice(0, 16), slice(16, 32)):
    halves = count(halves, {k: v[sl] for k, v in b.items()}, mask[sl])
  halves = halves[TABLE]
  assert isinstance(halves, sparse.TouchedRowCounts) == compact  # 40 rows at most: the compact layout holds them
  ref, = sparse.clipped_row_counts([b["ids"]], mask, [R], 1.0)
  for rc in (whole, halves):
    np.testing.assert_allclose(np.asarray(_dense_view(rc).counts), np.asarray(ref), rtol=1e-6)
  assert float(_dense_view(whole).counts[7]) >= 1.0 * (1 - 1e-6)  # example 0's [7, 7, 7]: one distinct row, weight 1
  # The touched list is exactly the rows with a positive count, each once, whatever the chunking.
  for rc in (whole, halves):
    positive = np.flatnonzero(np.asarray(_dense_view(rc).counts) > 0)
    n = int(rc.num_touched)
    assert n == len(positive) and 300 not in positive and 9 in positive
    np.testing.assert_array_equal(np.sort(np.asarray(rc.touched)[:n]), positive)
    assert np.all(np.asarray(rc.touched)[n:] == R)
    if compact:  # ascending, each count beside its row
      np.testing.assert_array_equal(np.asarray(rc.touched)[:n], positive)
      np.testing.assert_allclose(np.asarray(rc.counts)[:n], np.asarray(ref)[positive], rtol=1e-6)
      assert np.all(np.asarray(rc.counts)[n:] == 0)


@pytest.mark.parametrize("max_touched", [64, 38, 37, 8])
def test_compact_counts_that_would_overflow_turn_dense_and_drop_no_row(max_touched):
  """A chunk that brings the touched rows above T: the table goes dense before it, never losing a row's count."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  count = sparse.make_count_fn(lambda b: [b["ids"]], {TABLE: R}, mesh, count_clip=1.0)
  b = _batch(3, 48)
  mask = np.ones(48, np.float32)
  distinct = len(np.unique(b["ids"]))
  assert distinct == 38  # seed 3: 38 distinct rows, so T = 38 holds them and 37 does not
  rc = sparse.zero_counts({TABLE: R}, max_touched)
  assert isinstance(rc[TABLE], sparse.TouchedRowCounts)
  for sl in (slice(0, 16), slice(16, 32), slice(32, 48)):
    rc = count(rc, {k: v[sl] for k, v in b.items()}, mask[sl])
  rc = rc[TABLE]
  assert isinstance(rc, sparse.TouchedRowCounts) == (max_touched >= distinct)
  ref, = sparse.clipped_row_counts([b["ids"]], mask, [R], 1.0)
  np.testing.assert_allclose(np.asarray(_dense_view(rc).counts), np.asarray(ref), rtol=1e-6)
  assert int(rc.num_touched) == distinct


@pytest.mark.parametrize("max_touched", [64, 8])  # 64: the fast branch of both; 8: dense counts, dense branch
def test_selection_is_the_same_from_either_layout_and_from_the_counts(max_touched):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  count = sparse.make_count_fn(lambda b: [b["ids"]], {TABLE: R}, mesh, count_clip=1.0)
  b, mask = _batch(1, 32), np.ones(32, np.float32)
  dense = count(sparse.zero_counts({TABLE: R}, max_touched, compact=False), b, mask)[TABLE]
  compact = count(sparse.zero_counts({TABLE: R}, max_touched, compact=True), b, mask)[TABLE]
  assert isinstance(compact, sparse.TouchedRowCounts) == (max_touched == 64)
  kw = dict(noise_std=0.5, threshold=0.4, max_rows=16)
  for seed in range(5):
    key = jax.random.key(seed)
    a = sparse.select_rows(dense.counts, key, max_touched=max_touched, **kw)
    d = sparse.select_rows(dense.counts, key, max_touched=max_touched, touched=dense.touched,
                           num_touched=dense.num_touched, **kw)
    if isinstance(compact, sparse.TouchedRowCounts):
      c = sparse.select_touched_rows(compact.counts, compact.touched, key, rows=R, **kw)
    else:
      c = sparse.select_rows(compact.counts, key, max_touched=max_touched, touched=compact.touched,
                             num_touched=compact.num_touched, **kw)
    for other in (d, c):
      np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(other.ids))
      np.testing.assert_array_equal(np.asarray(a.valid), np.asarray(other.valid))
      assert int(a.num_selected) == int(other.num_selected) > 0


def test_compact_counting_allocates_nothing_table_sized():
  """The compact count step and the selection from it: memory and noise draws scale with T, not with R."""
  rows, b, t = 1 << 20, 64, 1024
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  count = sparse.make_count_fn(lambda x: [x["ids"]], {TABLE: rows}, mesh, count_clip=1.0)
  batch, mask = {"ids": np.arange(b * N_IDS, dtype=np.int32).reshape(b, N_IDS)}, np.ones(b, np.float32)
  zero = sparse.zero_counts({TABLE: rows}, t)
  mem = count.compact_jitted.lower(zero, batch, mask).compile().memory_analysis()
  if mem is None:
    pytest.skip("this backend reports no memory analysis")
  total = mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes
  assert total < 64 * (t + b * N_IDS), mem  # a few words per slot; an [R] float vector alone would be 4 MiB
  rc = count(zero, batch, mask)[TABLE]
  assert isinstance(rc, sparse.TouchedRowCounts) and int(rc.num_touched) == b * N_IDS
  select = functools.partial(sparse.select_touched_rows, rows=rows, noise_std=1.0, threshold=2.0, max_rows=256)
  draws = max(_uint32_sizes(jax.make_jaxpr(select)(rc.counts, rc.touched, jax.random.key(0)).jaxpr, []))
  assert draws <= 2 * t  # the dense selection would draw R


# ----------------------------------------------------------------------------- 8 simulated devices


@pytest.fixture(scope="module")
def devices8(tmp_path_factory):
  out = tmp_path_factory.mktemp("sparse8")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(out / "sparse8.npz"))


@pytest.mark.slow
def test_same_sparse_update_on_1_and_8_devices_with_tables_sharded_by_rows(devices8):
  ref, metrics = run_steps(sharding.MeshConfig(data=1))
  assert metrics[-1]["selected_rows"] > 0 and metrics[-1]["update_sparsity"] < 0.5
  assert not np.allclose(ref["table"], np.asarray(_params()["emb"]["table"]))  # it trained
  assert devices8["d2f4/rows_sharded"] == 1 and devices8["d8/rows_sharded"] == 0
  dense_ref, _ = run_steps(sharding.MeshConfig(data=1), compact=False)  # the two layouts: the same training
  np.testing.assert_allclose(dense_ref["table"], ref["table"], rtol=1e-5, atol=1e-6)
  for mesh in ("d8", "d2f4", "d8dense", "d2f4dense"):
    np.testing.assert_allclose(devices8[f"{mesh}/table"], ref["table"], rtol=1e-5, atol=1e-6, err_msg=mesh)
    np.testing.assert_allclose(devices8[f"{mesh}/w"], ref["w"], rtol=1e-5, atol=1e-6, err_msg=mesh)
    moved = np.any(devices8[f"{mesh}/table"] != np.asarray(_params()["emb"]["table"]), axis=1)
    np.testing.assert_array_equal(moved, np.any(ref["table"] != np.asarray(_params()["emb"]["table"]), axis=1))


def _worker(out_dir):
  assert jax.device_count() == 8, jax.device_count()
  arrays = {}
  for name, cfg in (("d8", sharding.MeshConfig(data=8)), ("d2f4", sharding.MeshConfig(data=2, fsdp=4))):
    for layout, compact in (("", True), ("dense", False)):
      got, _ = run_steps(cfg, compact=compact)
      arrays.update({f"{name}{layout}/{k}": v for k, v in got.items()})
  np.savez(os.path.join(out_dir, "sparse8.npz"), **arrays)


if __name__ == "__main__":
  _worker(sys.argv[1])
