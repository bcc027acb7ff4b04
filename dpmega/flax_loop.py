"""``nnx_value_and_grad``: the private swap for ``nnx.value_and_grad`` in an NNX training loop.

It takes the model as the loop has it (an ``nnx.Module`` with ``BatchStat``/``RngState``/other state, called
on a batch), does the split itself (``nnx.split(model, wrt, ...)``: only ``wrt`` is differentiated, the rest
is closed over), and gives each example a batch axis of 1 and its own dropout ``nnx.Rngs``, derived from
the step's secret key. Everything private is :func:`dpmega.private_value_and_grad`'s.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from dpmega import flax_traps
from dpmega import noise as noise_lib
from dpmega.private_grad import private_value_and_grad

# The names under which :class:`dpmega.PoissonData` puts a step's :class:`dpmega.StepKey` (training) or the
# padding mask (evaluation) into a batch dict.
STEP = "dp_step"
MASK = "dp_mask"


def pop_step(batch: Any) -> tuple[Any, Any, Any]:
  """``(batch without the dpmega entries, step key or None, mask or None)`` for a dict batch."""
  if isinstance(batch, dict) and (STEP in batch or MASK in batch):
    rest = {k: v for k, v in batch.items() if k not in (MASK, STEP)}
    return rest, batch.get(STEP), batch.get(MASK)
  return batch, None, None


def nnx_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    clip_norm: float,
    noise_multiplier: float | None = None,
    expected_batch_size: float | None = None,
    has_aux: bool = False,
    batch_argnums: int | Sequence[int] = 1,
    wrt: Any = None,
    microbatch_size: int | None = None,
    grad_dtype: str | None = None,
    return_stats: bool = False,
    clipping: str = "auto",
    clip_rule: Any = None,
    noise_sampler: noise_lib.NoiseSampler | str = noise_lib.NoiseSampler.WIDE_TAIL,
) -> Callable[..., Any]:
  """The private counterpart of ``nnx.value_and_grad(loss_fn, has_aux=...)``.

  ``loss_fn(model, *args)`` is the loop's own batched loss (e.g. ``loss_fn(model, batch, rngs) -> (mean
  loss, logits)``). The returned ``f(model, *args, key=None, mask=None) -> (value, grads)`` differentiates
  the model's ``wrt`` state (``nnx.Param`` by default), so ``optimizer.update(model, grads)`` works as
  before. The key (a :class:`dpmega.StepKey`, with the mask and the noise parameters) may also come inside a
  dict batch from :class:`dpmega.PoissonData` (entry ``"dp_step"``; a ``"dp_mask"`` entry is the mask;
  both are removed before ``loss_fn`` sees the batch).

  Per example (a batch axis of 1): an ``nnx.Rngs`` argument is replaced by one of the example's own,
  derived from the step's secret key (so dropout masks differ between examples and steps); the model's
  other state (``BatchStat``, ``RngState``, ...) is closed over and not updated.

  Guarantee: as :func:`dpmega.private_value_and_grad` with ``argnums=0``: the Gaussian mechanism on a sum of
  sensitivity ``clip_norm`` over every ``wrt`` leaf, divided by ``expected_batch_size``.

  .. warning::
     ``BatchNorm`` in train mode is refused (:class:`dpmega.flax_traps.BatchStatisticsError`): batch
     statistics mix examples and would be released un-noised. Use ``nnx.GroupNorm``/``nnx.LayerNorm``, or
     frozen statistics (``use_running_average=True``). The value and ``aux`` (e.g. logits for
     ``nnx.MultiMetric``) are per example and un-noised: for monitoring only.

  Args:
    loss_fn: ``loss_fn(model, *args) -> loss`` or ``(loss, aux)``; batched, as in the non-private loop.
    clip_norm: C > 0.
    noise_multiplier: sigma >= 0; None: from the step's :class:`dpmega.StepKey`.
    expected_batch_size: the denominator of the mean, > 0 (``q * N``); None: from the step's key.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; aux leaves come back stacked over the batch.
    batch_argnums: which positions of ``(model, *args)`` hold the batch (default 1: the first after the model).
    wrt: an NNX filter of the differentiated state; None means ``nnx.Param``.
    microbatch_size: examples per scan step; must divide the (padded) batch size.
    grad_dtype: None (float32) or ``"params"``.
    return_stats: also return the :class:`dpmega.ClipStats`.
    clipping: ``"auto"``, ``"ghost"`` (the same as ``"auto"``) or ``"vmap"``.
    clip_rule: None or a :class:`dpmega.clipping.ClipRule` (normalized clipping, per-group clip budgets).
    noise_sampler: see :func:`dpmega.private_value_and_grad`.

  Returns:
    ``f(model, *args, key=None, mask=None) -> (value, grads)`` (``key`` None and no key in the batch:
    evaluation, ``grads`` None).

  Example:
    >>> import jax, jax.numpy as jnp, dpmega
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> def loss_fn(model, batch):
    ...   return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    >>> grad_fn = dpmega.nnx_value_and_grad(loss_fn, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
    >>> value, grads = grad_fn(model, batch, key=dpmega.step_key(dpmega.secret_bytes(), 0))
    >>> grads["kernel"].shape
    (3, 2)
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  wrt = nnx.Param if wrt is None else wrt
  batch_t = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
  if not batch_t or any(not isinstance(i, int) or i < 1 for i in batch_t):
    raise ValueError(f"batch_argnums must be >= 1 (position 0 is the model), got {batch_argnums=!r}.")
  kwargs = dict(clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                microbatch_size=microbatch_size, has_aux=has_aux, grad_dtype=grad_dtype, return_stats=return_stats,
                clipping=clipping, clip_rule=clip_rule, noise_sampler=noise_sampler)

  def split_loss(params, rest, graphdef, *args):
    return loss_fn(nnx.merge(graphdef, params, rest), *args)

  # The private functions are built once per (number of args, position of the Rngs), so jit caches persist.
  cache: dict[tuple, Callable[..., Any]] = {}

  def grad_fn(model, *args, key=None, mask=None):
    if not isinstance(model, nnx.Module):
      raise ValueError(f"nnx_value_and_grad's function takes an nnx.Module first, got {type(model).__name__}.")
    if max(batch_t) > len(args):
      raise ValueError(f"batch_argnums={batch_argnums!r} is out of range for the model and {len(args)} arg(s).")
    flax_traps.check_nnx_model(model)
    args = list(args)
    for i in batch_t:
      args[i - 1], k, m = pop_step(args[i - 1])
      key = k if key is None else key
      mask = m if mask is None else mask
    graphdef, params, rest = nnx.split(model, wrt, ...)
    flax_traps.check_differentiated(params, "model state selected by wrt")
    rngs_at = tuple(i for i, a in enumerate(args) if isinstance(a, nnx.Rngs))
    if len(rngs_at) > 1:
      raise ValueError(f"at most one nnx.Rngs argument can be made per-example, got {len(rngs_at)}.")
    sig = (len(args), rngs_at)
    if sig not in cache:
      cache[sig] = private_value_and_grad(
          split_loss, argnums=0, batch_argnums=tuple(i + 2 for i in batch_t),
          prng_argnum=rngs_at[0] + 3 if rngs_at else None, **kwargs)
    return cache[sig](params, rest, graphdef, *args, key=key, mask=mask)

  return grad_fn
