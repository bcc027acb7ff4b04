"""A Flax loop made private: one test per trap of issue 17 (each works, or stops with a DP-specific error)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import dpmega
from dpmega.accounting import Ledger, compute_epsilon

KW = dict(clip_norm=1e6, noise_multiplier=0.0)  # no clipping, no noise: the exact mean gradient


class LinenCNN(nn.Module):
  """Flattens with x.shape[0], like Flax's MNIST example: needs a batch axis."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(x)


def images(b=8, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(b, 6, 6, 1)), jnp.float32), jnp.asarray(rng.integers(0, 3, b))


def linen_setup():
  model = LinenCNN()
  x, y = images()
  params = model.init(jax.random.key(0), x[:1])["params"]
  return model, params, x, y


def batched_loss(apply_fn, params, x, y):
  logits = apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def assert_trees_close(a, b, **kw):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), **kw)


# 1. A per-example loss on a CNN that flattens with x.shape[0]: each example is a batch of one.
def test_batched_cnn_loss_as_it_is_gives_the_exact_mean_gradient_and_stacked_aux():
  model, params, x, y = linen_setup()
  fn = dpmega.private_value_and_grad(lambda p, xb, yb: batched_loss(model.apply, p, xb, yb), has_aux=True,
                                     batch_argnums=(1, 2), expected_batch_size=8, **KW)
  (loss, logits), grads = fn(params, x, y, key=dpmega.step_key(dpmega.secret_bytes(), 0))
  (want_loss, want_logits), want = jax.value_and_grad(
      lambda p: batched_loss(model.apply, p, x, y), has_aux=True)(params)
  assert logits.shape == (8, 3)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
  assert_trees_close(grads, want, rtol=1e-4, atol=1e-6)


class NNXNet(nnx.Module):
  def __init__(self, rngs, *, batch_norm_train=False, dropout=0.5):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, use_running_average=not batch_norm_train, rngs=rngs)
    self.drop = nnx.Dropout(dropout)
    self.out = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = self.drop(nnx.relu(self.bn(self.conv(x))), rngs=rngs)
    return self.out(x.reshape(x.shape[0], -1))


def nnx_loss(model, batch, rngs):
  logits = model(batch["image"], rngs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), logits


# 2. The model's other state (frozen BatchStat, RngState) does not break the split; grads are the Params'.
def test_nnx_helper_splits_params_from_the_rest_and_the_optimizer_takes_its_grads():
  model = NNXNet(nnx.Rngs(0), dropout=0.0)
  x, y = images()
  batch = {"image": x, "label": y}
  fn = dpmega.nnx_value_and_grad(nnx_loss, has_aux=True, expected_batch_size=8, **KW)
  (loss, logits), grads = fn(model, batch, None, key=dpmega.step_key(dpmega.secret_bytes(), 0))
  (_, want_logits), want = nnx.value_and_grad(nnx_loss, has_aux=True)(model, batch, None)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(nnx.state(model, nnx.Param))
  assert_trees_close(grads, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  before = np.asarray(model.out.kernel[...])
  optimizer.update(model, grads)
  assert not np.allclose(before, model.out.kernel[...])


# 3. Non-array arguments (state.apply_fn, a graphdef) are static, not "abstract arrays".
def test_non_array_arguments_are_allowed_and_do_not_recompile():
  model, params, x, y = linen_setup()
  traces = []

  def loss(apply_fn, p, xb, yb):
    traces.append(1)
    return batched_loss(apply_fn, p, xb, yb)[0]

  fn = dpmega.private_value_and_grad(loss, argnums=1, batch_argnums=(2, 3), expected_batch_size=8, **KW)
  secret = dpmega.secret_bytes()
  _, g1 = fn(model.apply, params, x, y, key=dpmega.step_key(secret, 0))
  n = len(traces)
  _, g2 = fn(model.apply, params, x, y, key=dpmega.step_key(secret, 1))
  assert len(traces) == n  # same static argument: the compiled step is reused
  assert_trees_close(g1, g2)


# 4. Batch statistics: refused with a DP-specific error, before any compute.
def test_linen_mutable_batch_stats_in_aux_is_refused():
  class BN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))

  model = BN()
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)

  def loss(params, batch_stats, x):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])
    return out.sum(), updates

  fn = dpmega.private_value_and_grad(loss, has_aux=True, batch_argnums=2, noise_multiplier=1.0,
                                     expected_batch_size=4, clip_norm=1.0)
  with pytest.raises(dpmega.BatchStatisticsError, match=r"aux.*batch_stats.*GroupNorm or LayerNorm"):
    fn(variables["params"], variables["batch_stats"], jnp.ones((4, 3)), key=jax.random.key(0))


def test_nnx_batchnorm_in_train_mode_is_refused_before_the_loss_runs():
  calls = []
  model = NNXNet(nnx.Rngs(0), batch_norm_train=True)
  fn = dpmega.nnx_value_and_grad(lambda m, b, r: calls.append(1) or nnx_loss(m, b, r)[0], clip_norm=1.0,
                                 noise_multiplier=1.0, expected_batch_size=8)
  x, y = images()
  with pytest.raises(dpmega.BatchStatisticsError, match=r"bn is an nnx.BatchNorm in train mode.*GroupNorm"):
    fn(model, {"image": x, "label": y}, None, key=jax.random.key(0))
  assert not calls


def test_differentiating_batch_stats_is_refused_in_every_form():
  model = NNXNet(nnx.Rngs(0))
  loss = lambda s, ex: jnp.sum(ex)
  fn = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
  with pytest.raises(dpmega.BatchStatisticsError, match=r"nnx.BatchStat"):
    fn(nnx.state(model, nnx.Param, nnx.BatchStat), jnp.ones((4, 2)), jax.random.key(0))
  with pytest.raises(dpmega.BatchStatisticsError, match=r"batch_stats.*batch statistic"):
    fn({"params": {"w": jnp.ones(2)}, "batch_stats": {"mean": jnp.ones(2)}}, jnp.ones((4, 2)), jax.random.key(0))
  with pytest.raises(dpmega.BatchStatisticsError, match=r"nnx.BatchStat"):
    dpmega.nnx_value_and_grad(lambda m, b: jnp.sum(b), wrt=nnx.Any(nnx.Param, nnx.BatchStat), clip_norm=1.0,
                              noise_multiplier=1.0, expected_batch_size=4)(model, jnp.ones((4, 2)),
                                                                           key=jax.random.key(0))


# 5. Dropout: every example gets its own mask, from the step's secret key.
def test_dropout_masks_differ_per_example_and_per_step_and_follow_the_step_key():
  model = NNXNet(nnx.Rngs(0), dropout=0.5)
  model.train()
  model.bn.use_running_average = True  # frozen statistics, dropout on
  x = jnp.broadcast_to(images(1)[0], (8, 6, 6, 1))  # eight identical examples
  batch = {"image": x, "label": jnp.zeros(8, jnp.int32)}
  fn = dpmega.nnx_value_and_grad(nnx_loss, has_aux=True, clip_norm=1.0, noise_multiplier=1.0,
                                 expected_batch_size=8)
  secret = dpmega.secret_bytes()
  (_, a), _ = fn(model, batch, nnx.Rngs(0), key=dpmega.step_key(secret, 0))
  (_, b), _ = fn(model, batch, nnx.Rngs(0), key=dpmega.step_key(secret, 0))
  (_, c), _ = fn(model, batch, nnx.Rngs(0), key=dpmega.step_key(secret, 1))
  a, b, c = map(np.asarray, (a, b, c))
  assert len({row.tobytes() for row in a}) == 8  # identical inputs, eight different dropout masks
  np.testing.assert_array_equal(a, b)  # a function of the step key only
  assert not np.allclose(a, c)


def test_prng_argnum_gives_each_example_its_own_key_in_a_linen_loss():
  def loss(w, x, key):
    return jnp.sum(jax.random.bernoulli(key, 0.5, x.shape) * x * w), jax.random.key_data(key)

  fn = dpmega.private_value_and_grad(loss, has_aux=True, batch_argnums=1, prng_argnum=2, clip_norm=1.0,
                                     noise_multiplier=0.0, expected_batch_size=6)
  (_, keys), _ = fn(jnp.ones(4), jnp.ones((6, 4)), None, key=jax.random.key(3))
  assert len({tuple(np.asarray(k).ravel()) for k in keys}) == 6


# 6. Sampling: Poisson batches of one fixed shape, the mask travels with the key, the ledger records them.
def test_poisson_data_steps_are_poisson_padded_masked_and_recorded():
  n, b = 2000, 100
  data = dpmega.PoissonData({"x": np.arange(n, dtype=np.float32)}, expected_batch_size=b, noise_multiplier=1.1)
  sizes = []
  for step, batch in enumerate(data.batches(60)):
    mask = np.asarray(batch["dp_step"].mask)
    assert batch["x"].shape == (data.batch_size,) and mask.shape == (data.batch_size,)
    k = int(mask.sum())
    assert mask[:k].all() and not mask[k:].any()
    assert len(set(batch["x"][:k].tolist())) == k  # distinct examples, no repeats
    sizes.append(k)
    assert data.ledger.num_steps == step + 1  # recorded when handed out
  assert len(set(sizes)) > 5 and abs(np.mean(sizes) - b) < 4 * np.sqrt(b / len(sizes))
  want = Ledger()
  want.record(batch_size=b, dataset_size=n, noise_multiplier=1.1, scheme="poisson", steps=60)
  assert data.ledger == want


def test_the_step_key_brings_its_mask_so_padding_is_never_counted():
  w = jnp.array([1.0, -1.0])
  loss = lambda w, x: jnp.mean(x @ w)
  fn = dpmega.private_value_and_grad(loss, batch_argnums=1, clip_norm=1e6)
  x = jnp.ones((4, 2)).at[2:].set(100.0)  # rows 2, 3 are padding
  step = dpmega.StepKey(jax.random.key(0), jnp.array([1.0, 1.0, 0.0, 0.0]), noise_multiplier=0.0,
                        expected_batch_size=2)
  value, grads = fn(w, x, key=step)
  np.testing.assert_allclose(grads, [1.0, 1.0])
  np.testing.assert_allclose(value, 0.0)


def test_a_poisson_batch_larger_than_the_padded_shape_raises_never_truncates():
  data = dpmega.PoissonData({"x": np.zeros(100)}, expected_batch_size=50, noise_multiplier=1.0, batch_size=8)
  with pytest.raises(RuntimeError, match="never|dropping"):
    next(iter(data))


# 7. Evaluation: key=None, any batch size, no micro-batch multiple, no noise.
def test_key_none_evaluates_without_gradient_on_any_batch_size():
  model, params, x, y = linen_setup()
  fn = dpmega.private_value_and_grad(lambda p, xb, yb: batched_loss(model.apply, p, xb, yb), has_aux=True,
                                     batch_argnums=(1, 2), microbatch_size=4, expected_batch_size=8, **KW)
  (loss, logits), grads = fn(params, x[:7], y[:7], key=None)
  assert grads is None and logits.shape == (7, 3)
  np.testing.assert_allclose(loss, batched_loss(model.apply, params, x[:7], y[:7])[0], rtol=1e-5)
  batches = list(dpmega.eval_batches({"x": np.asarray(x), "y": np.asarray(y)}, 3))
  assert [b["dp_mask"].tolist() for b in batches][-1] == [1.0, 1.0, 0.0]


# 8. A whole TrainState: its params are differentiated; the int step is never noised.
def test_train_state_params_are_differentiated_and_its_step_stays_an_int():
  model, params, x, y = linen_setup()
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1, 0.9))
  state = state.replace(step=jnp.asarray(0, jnp.int32))  # as after a jitted step: an int32 leaf

  def loss(state, xb, yb):
    return batched_loss(state.apply_fn, state.params, xb, yb)[0]

  fn = dpmega.private_value_and_grad(loss, batch_argnums=(1, 2), clip_norm=1.0, noise_multiplier=1.0,
                                     expected_batch_size=8)
  _, grads = fn(state, x, y, key=dpmega.step_key(dpmega.secret_bytes(), 0))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  new = state.apply_gradients(grads=grads)
  assert new.step.dtype == jnp.int32 and int(new.step) == 1


# 9. bf16 params: grad_dtype="params" keeps the optimizer state's dtype through a lax.scan over steps.
def test_grad_dtype_params_keeps_bf16_through_a_scanned_momentum_loop():
  w = jnp.ones(3, jnp.bfloat16)
  fn = dpmega.private_value_and_grad(lambda w, x: jnp.mean(x @ w), batch_argnums=1, grad_dtype="params",
                                     clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
  opt = optax.sgd(0.1, momentum=0.9)
  x = jnp.ones((4, 3), jnp.bfloat16)

  def step(carry, key):
    w, s = carry
    _, g = fn(w, x, key=key)
    u, s = opt.update(g, s, w)
    return (optax.apply_updates(w, u), s), None

  (w2, s2), _ = jax.lax.scan(step, (w, opt.init(w)), jax.random.split(jax.random.key(0), 3))
  assert w2.dtype == jnp.bfloat16 and all(l.dtype == jnp.bfloat16 for l in jax.tree_util.tree_leaves(s2))


# 10. Keys: secret per run and per step; never in a repr; the noise that runs is the noise recorded.
def test_step_keys_are_secret_fresh_per_run_and_match_the_ledger():
  arrays = {"x": np.zeros(100)}
  a = dpmega.PoissonData(arrays, expected_batch_size=10, noise_multiplier=1.0)
  b = dpmega.PoissonData(arrays, expected_batch_size=10, noise_multiplier=1.0)
  ka, kb = a.next_step().key, b.next_step().key
  kdata = lambda k: np.asarray(jax.random.key_data(k.key)).tolist()
  assert kdata(ka) != kdata(kb) and kdata(ka) != kdata(a.next_step().key)
  for r in (repr(a), repr(ka)):
    assert str(kdata(ka)[0]) not in r and "secret" not in r
  fn = dpmega.private_value_and_grad(lambda w, x: jnp.mean(x @ w), batch_argnums=1, clip_norm=1.0,
                                     noise_multiplier=0.5)
  with pytest.raises(ValueError, match=r"noise_multiplier=0.5 differs from the step's 1.0"):
    fn(jnp.ones(1), jnp.ones((a.batch_size, 1)), key=ka)


# 11. Epsilon through dpmega, no dp-accounting call in user code.
def test_poisson_data_epsilon_is_the_ledgers_epsilon():
  data = dpmega.PoissonData({"x": np.zeros(1000)}, expected_batch_size=50, noise_multiplier=1.0)
  assert data.epsilon(1e-5) == 0.0
  list(data.steps(30))
  eps = data.epsilon(1e-5)
  want = Ledger()
  want.record(batch_size=50, dataset_size=1000, noise_multiplier=1.0, scheme="poisson", steps=30)
  assert 0 < eps == compute_epsilon(want, 1e-5)


def test_bad_new_arguments_name_the_field():
  f = lambda w, x: jnp.sum(x)
  for kwargs, field in (({"batch_argnums": -1}, "batch_argnums"), ({"prng_argnum": 0}, "prng_argnum"),
                        ({"grad_dtype": "bf16"}, "grad_dtype"), ({"batch_argnums": 0}, "batch_argnums")):
    with pytest.raises(ValueError, match=field):
      dpmega.private_value_and_grad(f, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, **kwargs)
  fn = dpmega.private_value_and_grad(f, batch_argnums=1, clip_norm=1.0)
  with pytest.raises(ValueError, match="noise_multiplier is needed"):
    fn(jnp.ones(2), jnp.ones((2, 2)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="expected_batch_size"):
    dpmega.PoissonData({"x": np.zeros(10)}, expected_batch_size=11, noise_multiplier=1.0)


def test_poisson_data_reads_a_tfds_random_access_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds.data_source("mnist", split="train")
    data = dpmega.PoissonData(source, expected_batch_size=8, noise_multiplier=1.0)
    batch = next(iter(data))
    k = int(batch["dp_step"].mask.sum())
    assert batch["image"].shape == (data.batch_size, 28, 28, 1) and batch["label"].shape == (data.batch_size,)
    rows = data.sampler.indices_at(0, 8)  # the same Poisson sample, recomputed from the secret
    assert k == len(rows)
    np.testing.assert_array_equal(batch["label"][:k], [source[int(i)]["label"] for i in rows])
