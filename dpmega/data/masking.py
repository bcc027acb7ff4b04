"""Dynamic masking for masked-LM training: which tokens of a packed row are predicted, and how they are hidden.

Drawn per micro-batch from the step's key (:func:`mask_tokens`), as in BERT
(Devlin et al. 2019, section 3.1): 15% of the real tokens are chosen; 80% of
them become [MASK], 10% a random token, 10% stay.

Privacy: the masking of a row is drawn independently of the data from a key
that does not depend on it, so it is part of that row's per-example loss, not
a release; rows that are padding of the sampler (all [PAD]) get no prediction
slots and contribute zero.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpmega.data.wordpiece import SpecialIds


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Dynamic masking as in BERT (Devlin et al. 2019, section 3.1).

  Attributes:
    mask_rate: fraction of the maskable tokens of a row chosen for prediction
      (rounded; at least 1 if the row has any; at most ``max_predictions``).
    max_predictions: prediction slots per row (BERT: 20 for length 128).
    mask_token_prob: of the chosen tokens, the fraction replaced by [MASK].
    random_token_prob: the fraction replaced by a uniformly random non-special
      token; the rest are left unchanged (but still predicted).
  """

  mask_rate: float = 0.15
  max_predictions: int = 20
  mask_token_prob: float = 0.8
  random_token_prob: float = 0.1

  def __post_init__(self):
    if not 0.0 < self.mask_rate <= 1.0:
      raise ValueError(f"mask_rate must be in (0, 1], got {self.mask_rate=}.")
    if isinstance(self.max_predictions, bool) or not isinstance(self.max_predictions, int) or self.max_predictions < 1:
      raise ValueError(f"max_predictions must be an int >= 1, got {self.max_predictions=!r}.")
    if not (0.0 <= self.mask_token_prob <= 1.0 and 0.0 <= self.random_token_prob <= 1.0
            and self.mask_token_prob + self.random_token_prob <= 1.0):
      raise ValueError(
          "mask_token_prob and random_token_prob must be in [0, 1] with a sum <= 1, got "
          f"{self.mask_token_prob=}, {self.random_token_prob=}.")


@functools.partial(jax.jit, static_argnames=("config", "special", "vocab_size"))
def mask_tokens(
    input_ids: jax.Array,
    key: jax.Array,
    *,
    config: MaskingConfig,
    special: SpecialIds,
    vocab_size: int,
) -> dict[str, jax.Array]:
  """Chooses and corrupts the tokens to predict in each row; one key for the whole batch.

  Maskable tokens are those other than [PAD], [CLS] and [SEP]. In a row with
  ``n`` of them, exactly ``k = min(max_predictions, max(1, round(mask_rate *
  n)))`` distinct positions are chosen uniformly at random (``k = 0`` when
  ``n = 0``, e.g. a padding row). Each chosen token independently becomes
  [MASK] with probability ``mask_token_prob``, a uniformly random non-special
  token with probability ``random_token_prob``, and stays otherwise.

  Args:
    input_ids: ``[..., T]`` int token ids (packed rows).
    key: PRNG key (a fresh one per step and micro-batch).
    config: :class:`MaskingConfig`; ``max_predictions <= T``.
    special: the vocabulary's :class:`SpecialIds`.
    vocab_size: ids are in ``[0, vocab_size)``.

  Returns:
    ``{"input_ids": [..., T] corrupted ids, "mlm_positions": [..., P],
    "mlm_labels": [..., P] original ids, "mlm_weights": [..., P] float32 1 for a
    used slot, 0 for an unused one}`` with ``P = max_predictions``; unused
    slots have position 0 and label 0.

  Example:
    >>> import jax, numpy as np
    >>> ids = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
    >>> row = np.array([[2] + list(range(5, 25)) + [3, 0, 0]])  # 20 maskable tokens
    >>> out = mask_tokens(row, jax.random.key(0), config=MaskingConfig(max_predictions=5),
    ...                   special=ids, vocab_size=30)
    >>> out["mlm_weights"].tolist()  # round(0.15 * 20) = 3 slots used
    [[1.0, 1.0, 1.0, 0.0, 0.0]]
  """
  ids = jnp.asarray(input_ids).astype(jnp.int32)
  t = ids.shape[-1]
  p = config.max_predictions
  if p > t:
    raise ValueError(f"max_predictions must be <= the sequence length {t}, got {config.max_predictions=}.")
  k_select, k_mode, k_random = jax.random.split(key, 3)
  maskable = (ids != special.pad) & (ids != special.cls) & (ids != special.sep)
  n = jnp.sum(maskable, axis=-1)
  k = jnp.round(config.mask_rate * n.astype(jnp.float32)).astype(jnp.int32)
  k = jnp.where(n > 0, jnp.clip(k, 1, p), 0)
  # Uniform scores on maskable tokens, -1 elsewhere: the top p scores are a
  # uniformly random ordering of the maskable positions (then the others);
  # the first k of them are a uniformly random k-subset.
  scores = jnp.where(maskable, jax.random.uniform(k_select, ids.shape), -1.0)
  _, positions = jax.lax.top_k(scores, p)
  weights = (jnp.arange(p) < k[..., None]).astype(jnp.float32)
  used = weights > 0
  labels = jnp.take_along_axis(ids, positions, axis=-1)

  normal = np.setdiff1d(np.arange(vocab_size), np.asarray(special.all))
  if normal.size == 0:
    raise ValueError(f"vocab_size must leave at least one non-special token, got {vocab_size=}.")
  random_tokens = jnp.asarray(normal, jnp.int32)[jax.random.randint(k_random, positions.shape, 0, normal.size)]
  u = jax.random.uniform(k_mode, positions.shape)
  new_tokens = jnp.where(
      u < config.mask_token_prob, special.mask,
      jnp.where(u < config.mask_token_prob + config.random_token_prob, random_tokens, labels))
  # Positions are distinct, so a one-hot scatter over [P, T] is exact.
  hit = (positions[..., :, None] == jnp.arange(t)) & used[..., :, None]
  replaced = jnp.sum(jnp.where(hit, new_tokens[..., :, None], 0), axis=-2)
  corrupted = jnp.where(jnp.any(hit, axis=-2), replaced, ids)
  return {
      "input_ids": corrupted,
      "mlm_positions": jnp.where(used, positions, 0).astype(jnp.int32),
      "mlm_labels": jnp.where(used, labels, 0).astype(jnp.int32),
      "mlm_weights": weights,
  }
