"""How a per-example norm becomes a clip weight: the plain rule, normalized clipping, per-group clip budgets.

Every clipping mode computes per-example norms and hands them, with a
:class:`ClipRule`, to :func:`dpmega.clipping.stats.combine`; this module says
what the weights are and why the sensitivity stays ``C``:

* **plain** (the default, Abadi et al. 2016): ``w = min(1, C / ||g||)``.
* **normalized** ("automatic" clipping, Bu et al. 2022,
  https://arxiv.org/abs/2206.07136): ``w = C / (||g|| + γ C)`` for every
  example, so every contribution has norm ``C ||g|| / (||g|| + γ C) < C`` and
  no clip norm needs tuning (the learning rate absorbs ``C``); ``γ > 0``
  (``stability``) keeps a zero gradient at weight ``1 / γ``, not ``1 / 0``.
* **per-group budgets** (Opacus' per-layer clipping, McMahan et al. 2018,
  https://arxiv.org/abs/1710.06963): the parameters are split into groups by
  regular expressions on their paths; group ``j`` has share ``f_j`` of ``C²``
  and is clipped on its own to ``C_j = C sqrt(f_j)``. With ``Σ f_j <= 1`` an
  example's whole contribution has norm ``<= sqrt(Σ C_j²) <= C``: the same
  sensitivity, so the same noise and the same ε. (Tables and dense layers
  whose gradients differ in scale by orders of magnitude no longer share one
  budget that the larger always wins.)

The norms the modes pass are upper bounds of the true norms up to ``1 + 5e-6``
(:mod:`dpmega.clipping.ghost`), so every weight above is conservative and the
``1 + 1e-5`` of the package guarantee holds per group and in total.

>>> rule = ClipRule(groups=parse_clip_groups("embed=0.75;.*=0.25"))
>>> rule.assign(["['params']['embed']['embedding']", "['params']['Dense_0']['kernel']"])
(0, 1)
>>> [round(float(b), 4) for b in rule.budgets(2.0)]
[1.7321, 1.0]
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from dpmega import validation

__all__ = ["ClipRule", "parse_clip_groups", "PLAIN"]


def parse_clip_groups(spec: str) -> tuple[tuple[str, float], ...]:
  """``"regex=share;regex=share"`` -> ``((regex, share), ...)``; the empty string is no groups.

  A parameter goes to the first group whose regular expression matches (``re.search``) its path as
  ``jax.tree_util.keystr`` writes it, e.g. ``['params']['Dense_0']['kernel']``.

  Raises:
    ValueError: naming ``clip_groups``, for a part without ``=``, a bad regular expression or a share outside
      ``(0, 1]``, or shares summing to more than 1.
  """
  spec = spec.strip()
  if not spec:
    return ()
  groups = []
  for part in spec.split(";"):
    pattern, sep, share = part.strip().rpartition("=")
    if not sep or not pattern:
      raise ValueError(f"clip_groups must be 'regex=share;regex=share' (e.g. 'embed=0.5;.*=0.5'), got part "
                       f"{part.strip()!r} of clip_groups={spec!r}.")
    try:
      value = float(share)
    except ValueError:
      raise ValueError(f"clip_groups: the share of {pattern!r} must be a number in (0, 1], got {share!r}.") from None
    groups.append((pattern, value))
  rule = ClipRule(groups=tuple(groups))  # checks the patterns and the shares
  return rule.groups


@dataclasses.dataclass(frozen=True)
class ClipRule:
  """How norms become weights (hashable: it is static to ``jax.jit``).

  Attributes:
    normalize: normalized ("automatic") clipping, ``w = C / (||g|| + stability C)``, instead of
      ``min(1, C / ||g||)``.
    stability: ``γ > 0`` of normalized clipping, relative to ``C`` (Bu et al. use 0.01).
    groups: ``((regex, share), ...)``: per-group budgets ``C sqrt(share)``, shares in ``(0, 1]`` summing to at
      most 1; empty: one group, budget ``C``.
  """

  normalize: bool = False
  stability: float = 0.01
  groups: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    validation.check_bool("normalize", self.normalize)
    validation.check_real("stability", self.stability, 0.0, math.inf, lo_open=True, hi_open=True)
    total = 0.0
    for pattern, share in self.groups:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"clip_groups: {pattern!r} is not a regular expression ({e}).") from None
      validation.check_real(f"clip_groups share of {pattern!r}", share, 0.0, 1.0, lo_open=True)
      total += share
    if total > 1.0 + 1e-12:
      raise ValueError(f"clip_groups shares must sum to at most 1 (each group gets C * sqrt(share), so the total "
                       f"sensitivity stays C), got {total:.6g} in {self.groups!r}.")

  @property
  def num_groups(self) -> int:
    return max(1, len(self.groups))

  def assign(self, paths: Sequence[str]) -> tuple[int, ...]:
    """The group of each parameter path (first matching pattern); all 0 without groups.

    Raises:
      ValueError: a path no pattern matches, or a group that no path falls in (a typo would otherwise leave its
        share unused and silently clip the others harder).
    """
    if not self.groups:
      return (0,) * len(paths)
    out = []
    for path in paths:
      hit = next((j for j, (pattern, _) in enumerate(self.groups) if re.search(pattern, path)), None)
      if hit is None:
        raise ValueError(f"clip_groups: parameter {path} matches none of {[p for p, _ in self.groups]}; add a "
                         "catch-all group such as '.*=0.2'.")
      out.append(hit)
    empty = [p for j, (p, _) in enumerate(self.groups) if j not in out]
    if empty:
      raise ValueError(f"clip_groups: group(s) {empty} match no parameter (paths look like {paths[0]}).")
    return tuple(out)

  def budgets(self, clip_norm) -> jnp.ndarray:
    """``[num_groups]`` float32 budgets ``C sqrt(share)`` (``[C]`` without groups)."""
    c = jnp.asarray(clip_norm, jnp.float32)
    if not self.groups:
      return c[None]
    # Rounded down to float32 so that sum_j budget_j^2 <= C^2 holds in float32 too.
    shares = jnp.asarray([math.sqrt(s) * (1 - 2.0**-23) for _, s in self.groups], jnp.float32)
    return c * shares * jnp.float32(1 - 2.0**-23)

  def weights(self, norms: jnp.ndarray, clip_norm) -> jnp.ndarray:
    """Weights for finite, non-negative ``norms`` (``[b]``, or ``[num_groups, b]``).

    ``C = 0`` gives 0; ``C = inf`` gives 1 under the plain rule (normalized clipping refuses it: it has no
    meaning there); a norm of 0 gives 1 (plain) or ``1 / γ`` (normalized), times a zero gradient.
    """
    budget = self.budgets(clip_norm)
    budget = budget[0] if norms.ndim == 1 else budget[:, None]
    if self.normalize:
      w = budget / (norms + jnp.float32(self.stability) * budget)
      return jnp.where(budget > 0, w, 0.0).astype(jnp.float32)
    safe = jnp.where(norms > 0, norms, 1.0)
    return jnp.where(norms > budget, budget / safe, 1.0).astype(jnp.float32)

  def validate_clip_norm(self, clip_norm) -> None:
    """Raises ValueError where the rule cannot use ``clip_norm`` (normalized clipping with ``C = inf``)."""
    if self.normalize and not isinstance(clip_norm, jax.core.Tracer) and math.isinf(float(clip_norm)):
      raise ValueError("clip_norm must be finite with normalized clipping (the weight C / (||g|| + γ C) of "
                       f"C = inf is undefined), got {clip_norm=}.")


PLAIN = ClipRule()
