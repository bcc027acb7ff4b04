"""CTR models in Flax Linen: Wide & Deep, DeepFM, a DLRM-style model, and a small embeddings + MLP.

Wide & Deep, DeepFM and DLRM read one example (or a batch: any leading axes) as ``dense``
``[..., num_dense]`` float32 and ``sparse`` ``[..., F]`` int32 hashed ids (the
output of :class:`dpmega.data.criteo.CriteoSource`), and return one logit
``[...]``. Categorical feature ``f`` owns ``buckets[f]`` rows of an
``nn.Embed`` table, so the tables are plain Linen parameters that per-example
clipping sees (:mod:`dpmega.clipping.rows` clips their lookups sparsely).
The task that trains them on Criteo data is :mod:`dpmega.tasks.ctr`.
:class:`CtrMlp` (``cat``, ``dense`` -> logit, one table per feature) is the
small model of the built-in ``synthetic_ctr`` task.

Parameter names (stable, for sharding rules and tests): ``embed/table``
(the deep ``[sum(buckets), d]`` table shared by all features, see
:class:`GroupedEmbed`; ``embed/table_d{w}`` per width when widths differ;
``embed/proj_{f}`` the projections of mixed-dimension embeddings;
``embed/mlet_table`` and ``embed/mlet_{f}`` the two MLET factors),
``wide/table`` and ``linear/table`` (first-order ``[sum(buckets), 1]``
tables), ``wide_cross`` (hashed cross products), ``dense_fields`` (DeepFM),
``mlp/layer_{i}``, ``bottom/layer_{i}``, ``top/layer_{i}``, ``logit``.

References:
  Cheng et al., "Wide & Deep Learning for Recommender Systems", DLRS 2016.
  https://arxiv.org/abs/1606.07792
  Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR
  Prediction", IJCAI 2017. https://arxiv.org/abs/1703.04247
  Naumov et al., "Deep Learning Recommendation Model for Personalization and
  Recommendation Systems", 2019. https://arxiv.org/abs/1906.00091
  Ginart et al., "Mixed Dimension Embeddings with Application to
  Memory-Efficient Recommendation Systems", 2019. https://arxiv.org/abs/1909.11810
  Ghaemmaghami et al., "Training with Multi-Layer Embeddings for Model
  Reduction" (MLET), 2020. https://arxiv.org/abs/2006.05623
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpmega import validation

_GOLDEN = 0x9E3779B1


class ModelKind(enum.Enum):
  """Which CTR architecture."""

  WIDE_DEEP = "wide_deep"
  DEEPFM = "deepfm"
  DLRM = "dlrm"


@dataclasses.dataclass(frozen=True)
class CtrModelConfig:
  """The shape of a CTR model.

  Attributes:
    kind: the architecture.
    buckets: rows of each categorical feature's table (one int per feature, >= 1).
    embed_dims: width of each feature's deep embedding (one int per feature,
      >= 1); DeepFM and DLRM need them all equal (dot products between fields).
    num_dense: number of dense (integer-count) features, >= 0.
    mlp_dims: hidden widths of the deep MLP (Wide & Deep, DeepFM) or of the
      top MLP (DLRM).
    bottom_mlp_dims: DLRM only: hidden widths of the bottom MLP over dense
      features (a last layer of width ``embed_dims[0]`` is appended).
    crosses: Wide & Deep only: pairs ``(f, g)`` of categorical features whose
      cross product is a wide feature (hashed into ``cross_buckets`` rows).
    cross_buckets: rows of the shared cross-product table (>= 1).
    embed_init_std: standard deviation of the deep tables' normal init (> 0).
    project_to: mixed-dimension embeddings (Ginart et al. 2019): feature ``f``'s
      ``embed_dims[f]``-wide embedding is projected to this common width by a
      learned ``embed_dims[f] x project_to`` map (none where the widths are
      equal); 0: off. Small widths for big tables cut the table parameters.
    mlet_inner: MLET (Ghaemmaghami et al. 2020): every deep table is trained as
      the product of a ``rows x k`` table and a ``k x embed_dims[f]`` map, with
      ``k = mlet_inner`` > every ``embed_dims[f]``; :func:`collapse_mlet` makes
      the ``rows x embed_dims[f]`` table afterwards. 0: off.
  """

  kind: ModelKind
  buckets: tuple[int, ...]
  embed_dims: tuple[int, ...]
  num_dense: int = 13
  mlp_dims: tuple[int, ...] = (64, 32)
  bottom_mlp_dims: tuple[int, ...] = (32,)
  crosses: tuple[tuple[int, int], ...] = ()
  cross_buckets: int = 10_000
  embed_init_std: float = 0.05
  project_to: int = 0
  mlet_inner: int = 0

  def __post_init__(self):
    object.__setattr__(self, "kind", ModelKind(self.kind))
    object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
    dims = self.embed_dims
    if isinstance(dims, (int, np.integer)):
      dims = (int(dims),) * len(self.buckets)
    object.__setattr__(self, "embed_dims", tuple(int(d) for d in dims))
    object.__setattr__(self, "mlp_dims", tuple(int(d) for d in self.mlp_dims))
    object.__setattr__(self, "bottom_mlp_dims", tuple(int(d) for d in self.bottom_mlp_dims))
    object.__setattr__(self, "crosses", tuple((int(a), int(b)) for a, b in self.crosses))
    f = len(self.buckets)
    if f < 1 or any(b < 1 for b in self.buckets):
      raise ValueError(f"buckets must be at least one int >= 1, got {self.buckets!r}.")
    if len(self.embed_dims) != f or any(d < 1 for d in self.embed_dims):
      raise ValueError(f"embed_dims must be an int >= 1 or {f} of them (one per feature), got {self.embed_dims!r}.")
    for name in ("project_to", "mlet_inner"):
      object.__setattr__(self, name, validation.check_int(name, getattr(self, name), 0, integral_floats=True))
    if self.mlet_inner and self.mlet_inner <= max(self.embed_dims):
      raise ValueError(f"mlet_inner must exceed every embed dim (MLET's inner width k > d) or be 0 (off), got "
                       f"mlet_inner={self.mlet_inner} with embed_dims up to {max(self.embed_dims)}.")
    if self.kind is not ModelKind.WIDE_DEEP and not self.project_to and len(set(self.embed_dims)) != 1:
      raise ValueError(f"embed_dims must all be equal for {self.kind.value} (fields interact by dot products), "
                       f"or set project_to (mixed dimensions projected to one width), got {self.embed_dims!r}.")
    if self.num_dense < 0:
      raise ValueError(f"num_dense must be >= 0, got {self.num_dense=}.")
    if any(d < 1 for d in self.mlp_dims + self.bottom_mlp_dims):
      raise ValueError(f"mlp_dims and bottom_mlp_dims must be ints >= 1, got {self.mlp_dims!r}, "
                       f"{self.bottom_mlp_dims!r}.")
    for a, b in self.crosses:
      if not (0 <= a < f and 0 <= b < f and a != b):
        raise ValueError(f"crosses must be pairs of distinct feature indices in [0, {f}), got {(a, b)}.")
    if sum(self.buckets) >= 2**31:
      raise ValueError(f"buckets must sum to less than 2**31 (int32 row ids), got {sum(self.buckets)}.")
    if self.cross_buckets < 1:
      raise ValueError(f"cross_buckets must be >= 1, got {self.cross_buckets=}.")
    if not self.embed_init_std > 0:
      raise ValueError(f"embed_init_std must be > 0, got {self.embed_init_std=}.")

  @property
  def num_sparse(self) -> int:
    return len(self.buckets)

  @property
  def field_dims(self) -> tuple[int, ...]:
    """The width of each feature's embedding as the model uses it (after any projection)."""
    return (self.project_to,) * self.num_sparse if self.project_to else self.embed_dims


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def cross_ids(sparse: jax.Array, crosses: Sequence[tuple[int, int]], num_buckets: int) -> jax.Array:
  """Hashed ids ``[..., len(crosses)]`` in ``[0, num_buckets)`` of feature-pair cross products.

  Deterministic (integer hashing, no parameters); pair ``p`` is salted by its
  index so that two pairs with the same ids land in unrelated rows.
  """
  a = jnp.stack([sparse[..., i] for i, _ in crosses], axis=-1).astype(jnp.uint32)
  b = jnp.stack([sparse[..., j] for _, j in crosses], axis=-1).astype(jnp.uint32)
  salt = (jnp.arange(1, len(crosses) + 1, dtype=jnp.uint32) * jnp.uint32(0x27D4EB2F))
  h = _fmix32(a * jnp.uint32(_GOLDEN) ^ _fmix32(b ^ salt))
  return (h % jnp.uint32(num_buckets)).astype(jnp.int32)


class _Mlp(nn.Module):
  dims: tuple[int, ...]
  activate_last: bool = True

  @nn.compact
  def __call__(self, x):
    for i, d in enumerate(self.dims):
      x = nn.Dense(d, name=f"layer_{i}")(x)
      if self.activate_last or i + 1 < len(self.dims):
        x = nn.relu(x)
    return x


class GroupedEmbed(nn.Module):
  """One table per distinct width: features of equal width share a table,
  feature ``f`` owning rows ``[offset_f, offset_f + buckets[f])``.

  Sharing keeps the number of gathers (and of parameters to clip, shard and
  compile for) at one per width instead of one per feature, with the same
  function as separate tables: rows of different features never alias, as
  long as each id is in ``[0, buckets[f])`` (which
  :class:`dpmega.data.criteo.CriteoSource` guarantees; ids out of range are
  not checked here).

  Returns the list of ``[..., dims[f]]`` embeddings, in feature order.
  """

  buckets: tuple[int, ...]
  dims: tuple[int, ...]
  init_std: float | None = None  # None: zeros
  project_to: int = 0  # CtrModelConfig.project_to
  mlet_inner: int = 0  # CtrModelConfig.mlet_inner

  @nn.compact
  def __call__(self, sparse: jax.Array) -> list[jax.Array]:
    init = nn.initializers.zeros if self.init_std is None else nn.initializers.normal(self.init_std)
    out = self._mlet(sparse, init) if self.mlet_inner else self._tables(sparse, init)
    if self.project_to:  # mixed dimensions: each feature's width to the common one (ghost-clipped Dense)
      out = [e if d == self.project_to else nn.Dense(self.project_to, use_bias=False, name=f"proj_{f}")(e)
             for f, (e, d) in enumerate(zip(out, self.dims))]
    return out

  def _mlet(self, sparse: jax.Array, init) -> list[jax.Array]:
    """One ``[sum(buckets), k]`` table for every feature, then feature ``f``'s ``k x dims[f]`` map."""
    offsets = np.cumsum((0,) + self.buckets[:-1]).astype(np.int32)
    table = nn.Embed(int(sum(self.buckets)), self.mlet_inner, embedding_init=init, name="mlet_table")
    rows = table(sparse.astype(jnp.int32) + offsets)  # [..., F, k]
    return [nn.Dense(d, use_bias=False, name=f"mlet_{f}")(rows[..., f, :]) for f, d in enumerate(self.dims)]

  def _tables(self, sparse: jax.Array, init) -> list[jax.Array]:
    widths = sorted(set(self.dims))
    out: list[Any] = [None] * len(self.buckets)
    for d in widths:
      feats = [f for f, w in enumerate(self.dims) if w == d]
      sizes = [self.buckets[f] for f in feats]
      offsets = np.cumsum([0] + sizes[:-1]).astype(np.int32)
      name = "table" if len(widths) == 1 else f"table_d{d}"
      table = nn.Embed(int(sum(sizes)), d, embedding_init=init, name=name)
      rows = table(sparse[..., np.asarray(feats)].astype(jnp.int32) + offsets)  # [..., len(feats), d]
      for k, f in enumerate(feats):
        out[f] = rows[..., k, :]
    return out


def _first_order(cfg: CtrModelConfig, sparse, name: str):
  """Sum over features of a learned scalar per id (a zero-initialized ``[sum(buckets), 1]`` table)."""
  terms = GroupedEmbed(cfg.buckets, (1,) * cfg.num_sparse, name=name)(sparse)
  return jnp.sum(jnp.concatenate(terms, axis=-1), axis=-1)


def _embeddings(cfg: CtrModelConfig, sparse):
  return GroupedEmbed(cfg.buckets, cfg.embed_dims, cfg.embed_init_std, cfg.project_to, cfg.mlet_inner,
                      name="embed")(sparse)


class WideDeep(nn.Module):
  """Wide & Deep (Cheng et al. 2016): a linear model over ids and their cross
  products, plus an MLP over the concatenated embeddings and dense features.

  ``logit = wide(ids, crosses, dense) + mlp([embed_f(id_f)]_f, dense)``.
  """

  config: CtrModelConfig

  @nn.compact
  def __call__(self, dense: jax.Array, sparse: jax.Array) -> jax.Array:
    cfg = self.config
    dense = dense.astype(jnp.float32)
    wide = _first_order(cfg, sparse, "wide")
    if cfg.crosses:
      ids = cross_ids(sparse, cfg.crosses, cfg.cross_buckets)
      table = nn.Embed(cfg.cross_buckets, 1, embedding_init=nn.initializers.zeros, name="wide_cross")
      wide = wide + jnp.sum(table(ids)[..., 0], axis=-1)
    if cfg.num_dense:
      wide = wide + nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros, name="wide_dense")(dense)[..., 0]
    x = jnp.concatenate(_embeddings(cfg, sparse) + [dense], axis=-1)
    x = _Mlp(cfg.mlp_dims, name="mlp")(x)
    return wide + nn.Dense(1, name="logit")(x)[..., 0]


class DeepFM(nn.Module):
  """DeepFM (Guo et al. 2017): first-order terms + a factorization machine over
  field embeddings + an MLP, all sharing the embeddings.

  Dense feature ``j`` is a field too, with vector ``x_j * w_j`` (a learned
  ``w_j``), so the FM also models dense x categorical interactions.
  """

  config: CtrModelConfig

  @nn.compact
  def __call__(self, dense: jax.Array, sparse: jax.Array) -> jax.Array:
    cfg = self.config
    dense = dense.astype(jnp.float32)
    d = cfg.field_dims[0]
    first = _first_order(cfg, sparse, "linear")
    embs = _embeddings(cfg, sparse)
    fields = jnp.stack(embs, axis=-2)  # [..., F, d]
    if cfg.num_dense:
      first = first + nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros, name="linear_dense")(dense)[..., 0]
      w = self.param("dense_fields", nn.initializers.normal(cfg.embed_init_std), (cfg.num_dense, d))
      fields = jnp.concatenate([fields, dense[..., :, None] * w], axis=-2)
    s = jnp.sum(fields, axis=-2)
    fm = 0.5 * jnp.sum(s * s - jnp.sum(fields * fields, axis=-2), axis=-1)
    x = jnp.concatenate(embs + [dense], axis=-1)
    deep = nn.Dense(1, name="logit")(_Mlp(cfg.mlp_dims, name="mlp")(x))[..., 0]
    return first + fm + deep


class Dlrm(nn.Module):
  """DLRM-style (Naumov et al. 2019): bottom MLP on dense features to the
  embedding width, pairwise dot products of all fields (strict upper
  triangle), concatenated with the bottom output, then the top MLP.
  """

  config: CtrModelConfig

  @nn.compact
  def __call__(self, dense: jax.Array, sparse: jax.Array) -> jax.Array:
    cfg = self.config
    d = cfg.field_dims[0]
    fields = _embeddings(cfg, sparse)
    if cfg.num_dense:
      bottom = _Mlp(cfg.bottom_mlp_dims + (d,), name="bottom")(dense.astype(jnp.float32))
      fields = [bottom] + fields
    t = jnp.stack(fields, axis=-2)  # [..., F(+1), d]
    z = jnp.einsum("...id,...jd->...ij", t, t)
    iu, ju = np.triu_indices(len(fields), k=1)
    x = z[..., iu, ju]
    if cfg.num_dense:
      x = jnp.concatenate([bottom, x], axis=-1)
    x = _Mlp(cfg.mlp_dims, name="top")(x)
    return nn.Dense(1, name="logit")(x)[..., 0]


class CtrMlp(nn.Module):
  """Embeddings of the categorical features, concatenated with the dense ones, then an MLP to one logit.

  The small model of the built-in ``synthetic_ctr`` task (:mod:`dpmega.tasks.builtin`): one
  ``nn.Embed`` table per feature (``embed_{i}``), ``dense_{i}`` layers, ``logit``.

  Works on one example (``cat [F]``, ``dense [D]``) or a batch (leading axes).
  """

  num_categorical: int
  vocab_size: int
  embed_dim: int
  hidden: Sequence[int]

  @nn.compact
  def __call__(self, cat: jax.Array, dense: jax.Array) -> jax.Array:
    embs = [nn.Embed(self.vocab_size, self.embed_dim, name=f"embed_{i}")(cat[..., i])
            for i in range(self.num_categorical)]
    x = jnp.concatenate(embs + [dense.astype(jnp.float32)], axis=-1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
    return nn.Dense(1, name="logit")(x)[..., 0]


_MODELS = {ModelKind.WIDE_DEEP: WideDeep, ModelKind.DEEPFM: DeepFM, ModelKind.DLRM: Dlrm}


def make_model(config: CtrModelConfig) -> nn.Module:
  """The Linen module for ``config.kind``."""
  return _MODELS[config.kind](config)


def collapse_mlet(config: CtrModelConfig, params: Any) -> tuple[CtrModelConfig, Any]:
  """An MLET model's config and params as the plain model's: each table multiplied out once after training.

  Feature ``f``'s rows of ``embed/mlet_table`` (``rows x k``) times ``embed/mlet_{f}`` (``k x embed_dims[f]``) are
  its rows of ``embed/table`` (``embed/table_d{w}`` per width): the model of ``config`` with ``mlet_inner = 0``
  then gives the same predictions (to float32 rounding) with ``k / d`` times fewer table parameters.

  Example:
    >>> cfg = CtrModelConfig(kind="dlrm", buckets=(5, 7), embed_dims=4, num_dense=2, mlet_inner=16)
    >>> model = make_model(cfg)
    >>> dense, sparse = jnp.ones((2,)), jnp.array([1, 6])
    >>> params = model.init(jax.random.key(0), dense, sparse)["params"]
    >>> plain_cfg, plain = collapse_mlet(cfg, params)
    >>> plain["embed"]["table"]["embedding"].shape
    (12, 4)
    >>> bool(jnp.allclose(model.apply({"params": params}, dense, sparse),
    ...                   make_model(plain_cfg).apply({"params": plain}, dense, sparse), rtol=1e-5, atol=1e-6))
    True
  """
  if not config.mlet_inner:
    raise ValueError("collapse_mlet needs an MLET model (mlet_inner > 0), got mlet_inner=0.")
  embed = dict(params["embed"])
  inner = jnp.asarray(embed.pop("mlet_table")["embedding"])
  offsets = np.cumsum((0,) + config.buckets[:-1])
  tables = [jnp.matmul(inner[o:o + b], jnp.asarray(embed.pop(f"mlet_{f}")["kernel"]), precision="highest")
            for f, (o, b) in enumerate(zip(offsets, config.buckets))]
  widths = sorted(set(config.embed_dims))
  for d in widths:  # GroupedEmbed's layout: one table per width, features in order
    embed["table" if len(widths) == 1 else f"table_d{d}"] = {
        "embedding": jnp.concatenate([t for t, w in zip(tables, config.embed_dims) if w == d], axis=0)}
  return dataclasses.replace(config, mlet_inner=0), {**params, "embed": embed}


def default_crosses(num_sparse: int, num_pairs: int = 8) -> tuple[tuple[int, int], ...]:
  """Crosses of consecutive feature pairs ``(0, 1), (2, 3), ...`` -- a neutral default."""
  return tuple((2 * i, 2 * i + 1) for i in range(min(num_pairs, num_sparse // 2)))


__all__ = ["ModelKind", "CtrModelConfig", "WideDeep", "DeepFM", "Dlrm", "CtrMlp", "GroupedEmbed", "make_model",
           "cross_ids", "default_crosses", "collapse_mlet"]
