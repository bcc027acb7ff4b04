"""``private_value_and_grad``: the DP-SGD counterpart of ``jax.value_and_grad``."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpmega import clipping as clipping_lib
from dpmega import flax_traps
from dpmega import noise as noise_lib

PyTree = Any

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


@jax.tree_util.register_pytree_node_class
class StepKey:
  """One step's secret noise key, its batch mask, and the (sigma, B) its ledger entry was recorded with.

  :class:`dpmega.PoissonData` hands these out; passed as ``key=`` it gives the private gradient its noise
  key, its mask and its noise parameters, so the noise that runs is the noise the accountant counted. It is
  a pytree (``key``, ``mask`` are leaves; sigma and B are static), so it passes through ``jax.jit``.

  Attributes:
    key: the typed PRNG key (:func:`dpmega.step_key`): secret, never log it.
    mask: ``[batch]`` float32, 1 for real examples and 0 for padding.
    noise_multiplier: sigma, as recorded.
    expected_batch_size: B, as recorded.
  """

  def __init__(self, key: Any, mask: Any, *, noise_multiplier: float, expected_batch_size: float):
    self.key, self.mask = key, mask
    self.noise_multiplier, self.expected_batch_size = noise_multiplier, expected_batch_size

  def __repr__(self) -> str:  # never the key
    return f"StepKey(noise_multiplier={self.noise_multiplier}, expected_batch_size={self.expected_batch_size})"

  def tree_flatten(self):
    return (self.key, self.mask), (self.noise_multiplier, self.expected_batch_size)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, noise_multiplier=aux[0], expected_batch_size=aux[1])


class _Static:
  """The non-array leaves of the arguments (``apply_fn``, a graphdef, ...), passed to ``jax.jit`` as static.

  Equal when the tree structure is equal and every leaf is equal (hashable leaves) or identical (others).
  """

  def __init__(self, treedef, leaves: tuple):
    self.treedef, self.leaves = treedef, leaves

  @staticmethod
  def _token(x):
    try:
      return ("h", hash(x))
    except TypeError:
      return ("id", id(x))

  def __hash__(self):
    return hash((self.treedef, tuple(self._token(x) for x in self.leaves)))

  def __eq__(self, other):
    if not isinstance(other, _Static) or self.treedef != other.treedef or len(self.leaves) != len(other.leaves):
      return False
    for a, b in zip(self.leaves, other.leaves):
      if a is b:
        continue
      if self._token(a)[0] == "id" or self._token(b)[0] == "id":
        return False
      try:
        if not bool(a == b):
          return False
      except Exception:  # pylint: disable=broad-except
        return False
    return True


def _partition(args: tuple) -> tuple[list, _Static, list[bool]]:
  leaves, treedef = jax.tree_util.tree_flatten(args)
  is_dyn = [isinstance(x, _ARRAY_TYPES) for x in leaves]
  dyn = [x for x, d in zip(leaves, is_dyn) if d]
  static = _Static(treedef, tuple(x for x, d in zip(leaves, is_dyn) if not d))
  return dyn, static, is_dyn


def _merge(dyn: list, static: _Static, is_dyn: tuple[bool, ...]) -> tuple:
  dyn_it, static_it = iter(dyn), iter(static.leaves)
  leaves = [next(dyn_it) if d else next(static_it) for d in is_dyn]
  return jax.tree_util.tree_unflatten(static.treedef, leaves)


def _as_indices(name: str, value: Any, *, allow_none: bool) -> tuple[int, ...] | None:
  if value is None and allow_none:
    return None
  t = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
  if not t or any(not isinstance(a, int) or isinstance(a, bool) or a < 0 for a in t):
    raise ValueError(f"{name} must be a non-negative int or a non-empty sequence of them, got {name}={value!r}.")
  return t


def _one_example(loss: jax.Array) -> jax.Array:
  """The loss of a batch of one as a scalar (a mean, a sum or an un-reduced ``[1]`` vector all work)."""
  if jnp.size(loss) != 1:
    raise ValueError(
        f"with batch_argnums, loss_fn is called on a batch of ONE example and must return one loss, got shape "
        f"{jnp.shape(loss)}; reduce over the batch axis (a mean or a sum) inside loss_fn.")
  return jnp.reshape(loss, ())


def _drop_batch_axis(aux: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda a: a[0] if jnp.ndim(a) and jnp.shape(a)[0] == 1 else a, aux)


def private_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    clip_norm: float,
    noise_multiplier: float | None = None,
    expected_batch_size: float | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    argnums: int | Sequence[int] = 0,
    batch_argnums: int | Sequence[int] | None = None,
    prng_argnum: int | None = None,
    grad_dtype: str | None = None,
    return_stats: bool = False,
    clipping: str = "auto",
    clip_rule: clipping_lib.ClipRule | None = None,
    noise_sampler: noise_lib.NoiseSampler | str = noise_lib.NoiseSampler.WIDE_TAIL,
) -> Callable[..., Any]:
  """Makes a function returning the loss and a DP-SGD noisy mean gradient.

  Two ways to call it:

  * **The batched model as it is** (``batch_argnums`` given): the user's own batched loss, e.g.
    ``loss_fn(params, images, labels) -> (mean loss, logits)``, with ``batch_argnums=(1, 2)``. Each example
    is passed to ``loss_fn`` as a batch of ONE (``x[None]``, as jax_privacy does by default), so a model that
    flattens with ``x.shape[0]`` works; the loss of that batch of one is the example's loss, and ``aux``
    leaves with a leading axis of 1 come back stacked over the batch (``logits`` shaped ``[b, 10]``, as
    without DP). The function is ``f(*args, key=..., mask=None) -> (value, grads)`` (``(value, grads,
    stats)`` with ``return_stats``): a drop-in for ``jax.value_and_grad(loss_fn, argnums, has_aux)``.
    ``key=None`` evaluates: ``(value, None)``, no gradient and no noise (eval batches need no key, no
    mask and no micro-batch multiple).
  * **A per-example loss** (``batch_argnums`` None, the original form): ``loss_fn(*args, example)`` takes
    ONE example without a batch axis, last; the function is ``f(*args, batch, key, mask=None) -> (value,
    grads, stats)``.

  The key must be secret: ``dpmega.step_key(secret, step)`` with ``secret = dpmega.secret_bytes()`` (or a
  :class:`StepKey` of :class:`dpmega.PoissonData`, which also carries the step's mask and the sigma and B
  its ledger recorded, checked against any given here), never ``jax.random.key(step)`` or a public seed,
  from which anyone could regenerate the noise and subtract it. Arguments that are not arrays
  (``state.apply_fn``, an NNX graphdef, a config) may be passed: they are static to ``jax.jit``.
  Arguments not in ``argnums`` are passed unchanged to every example. A Flax ``TrainState`` in
  ``argnums`` has its ``params`` differentiated (never its int ``step`` or optimizer state), and ``grads``
  are shaped like ``state.params``.

  Per example: gradient with respect to ``args[argnums]``; clipped to global L2 norm ``clip_norm`` over all
  of them; zeroed if masked or not finite. Then the sum over the batch (float32, micro-batch by micro-batch
  with ``lax.scan``), plus ``N(0, (noise_multiplier * clip_norm)^2)`` on each coordinate once, divided by
  ``expected_batch_size``.

  Guarantee: for one call, the returned gradient is the Gaussian mechanism with noise multiplier
  ``noise_multiplier`` applied to a sum with L2 sensitivity ``clip_norm`` (add/remove one example), then
  divided by a public constant. This holds whatever the per-example dropout keys (``prng_argnum``).

  .. warning::
     ``expected_batch_size`` must be the *expected* logical batch size of your sampler (``q * N`` under
     Poisson sampling), not the number of examples you actually got. The loss, ``aux`` and ``stats`` are
     computed from private data, per example and WITHOUT noise: they are for monitoring, not for release.
     Batch statistics in ``aux`` (Linen ``mutable=['batch_stats']``) or in the differentiated tree (NNX
     ``BatchStat``) are refused with :class:`dpmega.flax_traps.BatchStatisticsError`.

  Args:
    loss_fn: the loss (see above).
    clip_norm: C > 0 (``inf`` only with ``noise_multiplier == 0``).
    noise_multiplier: sigma >= 0; None: taken from each call's ``key``, a :class:`StepKey`.
    expected_batch_size: the denominator of the mean, > 0; None: taken from the :class:`StepKey`.
    microbatch_size: examples per scan step; must divide the batch size.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is returned per example.
    argnums: which positional args to differentiate.
    batch_argnums: which positional args hold the batch (leading axis b); None: the per-example form.
    prng_argnum: the position of a PRNG argument (a key or an ``nnx.Rngs``, e.g. for dropout) that each
      example gets its own of, derived from the step's secret key; what the caller passes there is
      replaced while training and passed unchanged when evaluating (``key=None``).
    grad_dtype: None (float32 gradients) or ``"params"`` (cast to each parameter's dtype, so a bf16 optimizer
      state keeps its dtype).
    return_stats: with ``batch_argnums``, also return the :class:`dpmega.ClipStats`.
    clipping: how per-example norms are computed: ``"auto"`` (default, fast ghost norms where possible),
      ``"ghost"`` (the same as ``"auto"``) or ``"vmap"``; all exact (see :func:`dpmega.clipping.clipped_grad_sum`).
    clip_rule: how norms become weights: None (``min(1, C / ||g||)``) or a :class:`dpmega.clipping.ClipRule`
      (normalized clipping, per-group clip budgets ``C sqrt(share)``); the sensitivity is ``C`` for every rule.
    noise_sampler: the Gaussian sampler (:class:`dpmega.noise.NoiseSampler`): ``"wide_tail"`` (default,
      support ±9.155 std) or ``"jax_bounded"``. Pass the same one to the accountant's ``δ_tail``.

  Returns:
    The private gradient function described above; ``loss`` is the mean per-example loss over the real
    examples, ``grads`` is shaped like ``args[argnums]`` (float32 unless ``grad_dtype="params"``).

  Example:
    >>> import jax, jax.numpy as jnp, dpmega
    >>> def loss(w, ex):
    ...   return (ex["x"] @ w - ex["y"]) ** 2
    >>> grad_fn = dpmega.private_value_and_grad(
    ...     loss, clip_norm=1.0, noise_multiplier=1.1, expected_batch_size=8)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros(8)}
    >>> secret = dpmega.secret_bytes()  # once per run, from the OS CSPRNG; never logged
    >>> value, grads, stats = grad_fn(jnp.ones(3), batch, dpmega.step_key(secret, 0))
    >>> float(value), grads.shape, int(stats.num_clipped)
    (9.0, (3,), 8)

    The batched loss as it is, one batch axis of size 1 per example:

    >>> def batched_loss(w, x, y):  # x: [b, 3]
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> grad_fn = dpmega.private_value_and_grad(
    ...     batched_loss, batch_argnums=(1, 2), clip_norm=1.0, noise_multiplier=1.1, expected_batch_size=8)
    >>> value, grads = grad_fn(jnp.ones(3), batch["x"], batch["y"], key=dpmega.step_key(secret, 1))
    >>> float(value), grads.shape
    (9.0, (3,))
  """
  clipping_lib.validate_clip_norm(clip_norm)
  if not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0 for a useful gradient, got {clip_norm=}.")
  if noise_multiplier is not None:
    noise_lib.validate_noise_multiplier(noise_multiplier)
  if math.isinf(float(clip_norm)) and noise_multiplier != 0:
    raise ValueError(f"clip_norm must be finite when noise_multiplier > 0, got {clip_norm=}.")
  if expected_batch_size is not None:
    noise_lib.validate_expected_batch_size(expected_batch_size)
  clipping_lib.validate_microbatch_size(microbatch_size)
  noise_sampler = noise_lib.as_sampler(noise_sampler)
  if clipping not in clipping_lib.clipping_modes():
    raise ValueError(f"clipping must be one of {clipping_lib.clipping_modes()}, got {clipping=!r}.")
  if clip_rule is not None:
    if not isinstance(clip_rule, clipping_lib.ClipRule):
      raise ValueError(f"clip_rule must be a dpmega.clipping.ClipRule or None, got {clip_rule!r}.")
    clip_rule.validate_clip_norm(clip_norm)
  single = isinstance(argnums, int)
  argnums_t = _as_indices("argnums", argnums, allow_none=False)
  batch_t = _as_indices("batch_argnums", batch_argnums, allow_none=True)
  prng_t = _as_indices("prng_argnum", prng_argnum, allow_none=True)
  if grad_dtype not in (None, "params"):
    raise ValueError(f"grad_dtype must be None (float32) or 'params', got {grad_dtype=!r}.")
  if batch_t is not None and set(batch_t) & set(argnums_t + (prng_t or ())):
    raise ValueError(f"batch_argnums={batch_argnums!r} must not overlap argnums={argnums!r} or prng_argnum.")
  if prng_t is not None and (len(prng_t) != 1 or prng_t[0] in argnums_t):
    raise ValueError(f"prng_argnum must be one int outside argnums, got {prng_argnum=!r}.")
  prng_i = prng_t[0] if prng_t else None
  batch_of_one = batch_t is not None

  def make_per_example(args, diff_parts):
    """``per_example(diff, example)``: the loss of one example; ``example = (batched args, key data)``."""
    batched = batch_t if batch_of_one else (len(args) - 1,)

    def per_example(diff_params, example):
      ex_args, key_data = example
      full = list(args)
      for i, rebuild, p in zip(argnums_t, diff_parts, diff_params):
        full[i] = rebuild(p)
      for i, ex in zip(batched, ex_args):
        full[i] = jax.tree_util.tree_map(lambda a: a[None], ex) if batch_of_one else ex
      if key_data is not None:
        ex_key = jax.random.wrap_key_data(key_data)
        full[prng_i] = _rngs_like(args[prng_i], ex_key)
      out = loss_fn(*full)
      loss, aux = out if has_aux else (out, None)
      if batch_of_one:
        loss, aux = _one_example(loss), _drop_batch_axis(aux)
      if has_aux:
        flax_traps.check_aux(aux)
        return loss, aux
      return loss

    return per_example, batched

  def noise_params(key):
    """``(key, sigma, B)``: from a :class:`StepKey` (checked against the given ones) or the given ones."""
    sigma, b = noise_multiplier, expected_batch_size
    if isinstance(key, StepKey):
      for name, mine, theirs in (("noise_multiplier", sigma, key.noise_multiplier),
                                 ("expected_batch_size", b, key.expected_batch_size)):
        if mine is not None and float(mine) != float(theirs):
          raise ValueError(f"{name}={mine} differs from the step's {theirs}, the value its ledger recorded: the "
                           f"epsilon would not be the epsilon of the noise that runs; pass one of them only.")
      sigma, b = key.noise_multiplier, key.expected_batch_size
      noise_lib.validate_noise_multiplier(sigma)
      noise_lib.validate_expected_batch_size(b)
      if math.isinf(float(clip_norm)) and sigma != 0:
        raise ValueError(f"clip_norm must be finite when noise_multiplier > 0, got {clip_norm=}.")
      return key.key, sigma, b
    for name, v in (("noise_multiplier", sigma), ("expected_batch_size", b)):
      if v is None:
        raise ValueError(f"{name} is needed: pass it to private_value_and_grad, or pass key= a dpmega.StepKey "
                         "(a step of dpmega.PoissonData).")
    return key, sigma, b

  @functools.partial(jax.jit, static_argnames=("static", "is_dyn", "evaluate", "sigma", "expected_b"))
  def _compute(dyn, key, mask, *, static, is_dyn, evaluate, sigma, expected_b):
    args = _merge(dyn, static, is_dyn)
    parts = [flax_traps.differentiated_part(args[i]) for i in argnums_t]
    diff = tuple(p for p, _ in parts)
    per_example, batched = make_per_example(args, [r for _, r in parts])
    ex_args = tuple(args[i] for i in batched)
    b = clipping_lib.leading_size(ex_args)
    if evaluate:
      out = jax.vmap(per_example, in_axes=(None, 0))(diff, (ex_args, None))
      losses, aux = out if has_aux else (out, None)
      loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
      return ((loss, aux) if has_aux else loss), None, None
    noise_key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    key_data = None
    if prng_i is not None:
      noise_key, ex_root = jax.random.split(noise_key)
      key_data = jax.random.key_data(jax.random.split(ex_root, b))
    grad_sum, aux, stats = clipping_lib.clipped_grad_sum(
        per_example, diff, (ex_args, key_data), mask,
        clip_norm=clip_norm, microbatch_size=microbatch_size, has_aux=has_aux, clipping=clipping,
        clip_rule=clip_rule)
    grads = noise_lib.privatize(
        grad_sum, noise_key, noise_multiplier=sigma, clip_norm=clip_norm,
        expected_batch_size=expected_b, sampler=noise_sampler)
    if grad_dtype == "params":
      grads = jax.tree_util.tree_map(lambda g, p: g.astype(jnp.result_type(p)), grads, diff)
    grads = grads[0] if single else grads
    loss = stats.mean_loss
    return ((loss, aux) if has_aux else loss), grads, stats

  def _run(args, key, mask, evaluate):
    sigma = expected_b = None
    if not evaluate:
      if isinstance(key, StepKey) and mask is None:
        mask = key.mask
      key, sigma, expected_b = noise_params(key)
    if max(argnums_t + (batch_t or ()) + (prng_t or ())) >= len(args):
      raise ValueError(f"argnums={argnums!r}, batch_argnums={batch_argnums!r}, prng_argnum={prng_argnum!r}: "
                       f"out of range for {len(args)} positional argument(s).")
    # Before tracing: what would break privacy, named from args[argnums]; integer leaves are refused alike in
    # every clipping mode.
    for i in argnums_t:
      diff, _ = flax_traps.differentiated_part(args[i])
      flax_traps.check_differentiated(diff, "params" if single else f"args[{i}]")
      clipping_lib.validate_params(diff)
    batched = batch_t if batch_of_one else (len(args) - 1,)
    b = clipping_lib.check_batch(tuple(args[i] for i in batched), mask, None if evaluate else microbatch_size)
    if mask is None:
      mask = jnp.ones((b,), jnp.float32)
    dyn, static, is_dyn = _partition(tuple(args))
    for i in batched:
      if any(not isinstance(x, _ARRAY_TYPES) for x in jax.tree_util.tree_leaves(args[i])):
        raise ValueError(f"args[{i}] is in batch_argnums, so every leaf must be an array with a batch axis.")
    return _compute(dyn, key, mask, static=static, is_dyn=tuple(is_dyn), evaluate=evaluate, sigma=sigma,
                    expected_b=expected_b)

  if batch_of_one:
    def private_grad_fn(*args, key, mask=None):
      value, grads, stats = _run(args, key, mask, evaluate=key is None)
      return (value, grads, stats) if return_stats else (value, grads)
  else:
    def private_grad_fn(*args_batch_key, mask=None):
      if len(args_batch_key) < 3:
        raise ValueError(
            "the private gradient function takes (*loss_args, batch, key, mask=None); "
            f"got {len(args_batch_key)} positional arguments.")
      *args, batch, key = args_batch_key
      if key is None:
        raise ValueError("key must be the step's secret key (dpmega.step_key(secret, step)), got key=None.")
      if max(argnums_t) >= len(args):
        raise ValueError(f"argnums={argnums!r} is out of range for {len(args)} argument(s) before the batch.")
      return _run((*args, batch), key, mask, evaluate=False)

  return private_grad_fn


def _rngs_like(template: Any, key: jax.Array) -> Any:
  """``key`` in the form of ``template``: an ``nnx.Rngs`` if it is one, else the key itself."""
  if type(template).__name__ == "Rngs":
    from flax import nnx  # pylint: disable=import-outside-toplevel

    if isinstance(template, nnx.Rngs):
      return nnx.Rngs(key)
  return key
