"""The trainer's sparse tables: the ``sparse.*`` config fields, their checks, and what a run needs to use them.

``sparse.enabled=True`` turns on sparsity-preserving DP-SGD for the embedding
tables whose parameter path matches ``sparse.tables`` (:mod:`dpmega.sparse`,
DP-AdaFEST, Ghazi et al. 2023): each logical step releases a private row
selection (clipped row-touch counts + ``N(0, (σ1 C1)²)`` above a threshold)
and the clipped gradient with ``N(0, (σ2 C)²)`` on the dense leaves and the
selected rows only; the optimizer runs lazily on them. The run's σ -- fixed, or
calibrated to ``target_epsilon`` -- is the effective ``σ_eff`` the ledger
records (:mod:`dpmega.sparse.selection`), split by ``selection_fraction`` f:
``σ1 = σ_eff / sqrt(f)``, ``σ2 = σ_eff / sqrt(1 - f)``. The threshold is in
units of the selection noise: ``τ = threshold · σ1 · C1``, so the chance that a
row no example touched is selected, ``P(N(0,1) > threshold)``, is the same at
every ε.

What is refused, before any compute and before the workdir is written
(:func:`check_config` at validation, :func:`build` when the model's shapes are
known): adaptive clipping (its noisy clipped count is a third release that the
selection's analysis does not compose), an optimizer that mixes coordinates
(``lamb``: lazy updates need an elementwise one), the effective-noise simulation,
a task that cannot give row counts (the counts come from the batch's ids, which
only the CTR tasks expose: :func:`ctr_table_ids`), and a pattern that matches no
table. Every clipping mode gives row counts (they do not come from the clipping
engine), so none is refused.

``δ_tail`` (:mod:`dpmega.truncation`): the selection draws one count coordinate
per row of each selection with the same sampler, so a sparse run's noised
coordinates are the parameters plus those rows (:func:`count_coordinates`;
tables that share a selection, ``sparse.share_selection``, count once).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dpmega.errors import UsageError
from dpmega.train import fields

Path = tuple[str, ...]
CTR_TASKS = ("ctr_wide_deep", "ctr_deepfm", "ctr_dlrm")


def _pattern(text: str) -> str:
  if not text:
    raise ValueError("must be a non-empty regular expression")
  try:
    re.compile(text)
  except re.error as e:
    raise ValueError(f"{text!r} is not a regular expression ({e})") from None
  return text


@dataclasses.dataclass(frozen=True)
class SparseSettings:
  """The ``sparse.*`` fields: sparsity-preserving updates of embedding tables (module docstring)."""

  enabled: bool = fields.flag(False, doc="sparsity-preserving DP-SGD for the tables (dpmega.sparse, DP-AdaFEST): "
                              "private row selection, noise on the selected rows only, lazy optimizer")
  tables: str = fields.text("embedding$", _pattern, syntax="a regex", doc="regex (re.search) on each parameter's "
                            "path 'a/b/c': the table leaves updated sparsely (each must be a CTR table)")
  # Defaults f = 0.3, tau = 2.75: the best measured at the issue's size (bench/RESULTS.md, "Utility at the issue's
  # size": 10^6 rows, 2^20-row tables with a long tail, 3-5 seeds at eps 1/3/8: within 0.26 AUC points of dense
  # DP-SGD; f = 0.2, tau = 2.5 was 0.04-0.1 points further; on 20k rows and 2^15-row tables it was the better one).
  selection_fraction: float = fields.real(0.3, 0.0, 1.0, lo_open=True, hi_open=True, doc="f: share of the noise "
                                          "budget sigma_eff^-2 given to selection (sigma1 = sigma_eff/sqrt(f), "
                                          "sigma2 = sigma_eff/sqrt(1-f))")
  threshold: float = fields.real(2.75, -10.0, 10.0, doc="tau in units of sigma1*C1: a row is selected when its noisy "
                                 "clipped count exceeds threshold*sigma1*C1")
  count_clip: float = fields.positive(1.0, doc="C1: L2 bound of each example's row-touch indicator")
  # K and T large enough for the issue-size benchmark (batch 8,192 over 2^20-row tables selects ~80k rows a step;
  # a K that binds cost 0.57-2.05 AUC points there). Both are static sizes of small buffers ([K, d] rows, T
  # counts), and min(., rows) of a small table.
  max_rows: int = fields.integer(2**17, 1, 2**31 - 1, doc="K: rows kept per table and step at most (a uniform "
                                 "subset of the selected ones beyond)")
  max_touched: int = fields.integer(2**20, 1, 2**31 - 1, doc="T: touched rows per table and step kept compactly "
                                    "(T counts, no table-sized vector) and selected fast; above it the step's "
                                    "counts turn dense (R floats) and one noisy count per row is drawn (same law, "
                                    "slower)")
  share_selection: bool = fields.flag(True, doc="tables reached by the same row ids (DeepFM's embed and linear) share "
                                      "one selection: each example's C1 is spread over its rows once, not once per "
                                      "table (sqrt(2) more count per row for two tables; same privacy)")


def check_config(values: Mapping[str, Any]) -> None:
  """The rules that tie ``sparse.*`` to other fields (called by :func:`dpmega.train.config.validate`).

  Raises:
    UsageError: naming the fields that cannot go together.
  """
  s = values["sparse"]
  if not s.enabled:
    return
  if values["adaptive_clip"]:
    raise UsageError("sparse.enabled=True cannot be combined with adaptive_clip=True: the adaptive clip norm's noisy "
                     "clipped count is a third release on the same sample that the selection's analysis does not "
                     "compose; turn one of them off.")
  o = values["optimizer"]
  for name, value in (("optimizer.name", o.name.value), ("optimizer.table_name", o.table_name)):
    if value == "lamb":
      raise UsageError(f"{name} must be an elementwise optimizer with sparse.enabled=True (lazy updates of the "
                       f"selected rows), got {name}='lamb' (its per-layer trust ratio mixes coordinates).")
  if values["simulate_k"]:
    raise UsageError(f"sparse.enabled=True needs a private run: simulate_k must be 0, got {values['simulate_k']}.")
  if values["task_name"] not in CTR_TASKS:
    raise UsageError(f"sparse.enabled=True needs a task whose batches give the rows each example touches "
                     f"({list(CTR_TASKS)}), got task.name={values['task_name']!r}.")


# ----------------------------------------------------------------------------------------------- row ids
def ctr_table_ids(model_cfg: Any) -> dict[Path, tuple[int, Callable[[Any], jax.Array], Any]]:
  """Every table of a :class:`dpmega.models.ctr.CtrModelConfig` model: ``path -> (rows, batch -> ids [b, n], source)``.

  Paths are those of :class:`dpmega.models.ctr.GroupedEmbed` (``embed``, ``linear``, ``wide``; one table per
  width, or MLET's ``mlet_table``) and the Wide & Deep cross table ``wide_cross``. Tables of the same ``source``
  (a hashable) have the same rows and get the same ids from every batch.

  Example:
    >>> from dpmega.models import ctr
    >>> m = ctr.CtrModelConfig(kind=ctr.ModelKind.DEEPFM, buckets=(3, 5), embed_dims=(4, 4), num_dense=1,
    ...                        mlp_dims=(2,))
    >>> ids = ctr_table_ids(m)
    >>> sorted(ids), ids[("embed", "table", "embedding")][0]
    ([('embed', 'table', 'embedding'), ('linear', 'table', 'embedding')], 8)
    >>> ids[("embed", "table", "embedding")][1]({"sparse": np.array([[2, 4]])}).tolist()
    [[2, 7]]
    >>> ids[("embed", "table", "embedding")][2] == ids[("linear", "table", "embedding")][2]
    True
  """
  from dpmega.models import ctr  # noqa: PLC0415 - the model module loads only for a sparse run

  buckets, dims = tuple(model_cfg.buckets), tuple(model_cfg.embed_dims)

  def grouped(feats):
    offsets = np.cumsum([0] + [buckets[f] for f in feats[:-1]]).astype(np.int32)
    cols = np.asarray(feats)
    return (int(sum(buckets[f] for f in feats)), lambda b: jnp.asarray(b["sparse"], jnp.int32)[:, cols] + offsets,
            ("features", tuple(feats)))

  out = {}
  every = list(range(len(buckets)))
  if model_cfg.mlet_inner:
    out[("embed", "mlet_table", "embedding")] = grouped(every)
  else:
    widths = sorted(set(dims))
    for d in widths:
      name = "table" if len(widths) == 1 else f"table_d{d}"
      out[("embed", name, "embedding")] = grouped([f for f, w in enumerate(dims) if w == d])
  first_order = {ctr.ModelKind.DEEPFM: "linear", ctr.ModelKind.WIDE_DEEP: "wide"}.get(model_cfg.kind)
  if first_order:
    out[(first_order, "table", "embedding")] = grouped(every)
  if model_cfg.kind == ctr.ModelKind.WIDE_DEEP and model_cfg.crosses:
    crosses, n = model_cfg.crosses, model_cfg.cross_buckets
    out[("wide_cross", "embedding")] = (int(n), lambda b: ctr.cross_ids(jnp.asarray(b["sparse"], jnp.int32),
                                                                         crosses, n), ("crosses",))
  return out


# ----------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass(frozen=True)
class SparseRun:
  """What the trainer needs for a sparse run: the update's spec, the table sizes, the batch's row ids.

  ``row_ids(batch)`` gives the ids of each selection (``spec.groups()``, keyed by its first table), in order.
  """

  spec: Any  # dpmega.sparse.SparseTables
  table_rows: dict[Path, int]
  row_ids: Callable[[Any], list[jax.Array]]

  @property
  def total_rows(self) -> int:
    return sum(self.table_rows.values())

  @property
  def selection_rows(self) -> dict[Path, int]:
    """Rows of each selection's counts, keyed by the first table of its group."""
    return self.spec.selection_rows(self.table_rows)

  def make_count_fn(self, mesh: Any) -> Callable[..., Any]:
    """The jitted ``count(counts, batch, mask) -> counts`` of a chunk (:func:`dpmega.sparse.make_count_fn`)."""
    from dpmega import sparse  # noqa: PLC0415

    return sparse.make_count_fn(self.row_ids, self.selection_rows, mesh, count_clip=self.spec.selection.count_clip)

  def zero_counts(self) -> Any:
    """The counts at the start of a logical step (:func:`dpmega.sparse.zero_counts`)."""
    from dpmega import sparse  # noqa: PLC0415

    return sparse.zero_counts(self.selection_rows, self.spec.selection.max_touched)

  def describe(self, sigma_eff: float) -> str:
    """The plan's line: tables, σ1 and σ2 at ``sigma_eff``, f, τ (both units), C1, K."""
    from dpmega import sparse  # noqa: PLC0415

    sel = self.spec.selection
    s1, s2 = sparse.split_noise_multiplier(sigma_eff, sel.selection_fraction)
    names = ", ".join("/".join(t) + f" ({r:,} rows)" for t, r in self.table_rows.items())
    shared = "".join(f"; {' and '.join('/'.join(t) for t in g)} share one selection" for g in self.spec.shared)
    return (f"sparse tables {names}{shared}: selection f = {sel.selection_fraction:g} of the noise budget, sigma1 = "
            f"{s1:.6g} (counts clipped to C1 = {sel.count_clip:g}), sigma2 = {s2:.6g} (gradient), threshold tau = "
            f"{sel.threshold:g} sigma1 C1 = {sel.absolute_threshold(s1):.4g}, at most {sel.max_rows:,} rows per table "
            f"and step; the ledger records sigma_eff = {sigma_eff:.6g}")

  def settings(self, sigma_eff: float) -> dict[str, Any]:
    """The summary's record of the selection at ``sigma_eff``."""
    from dpmega import sparse  # noqa: PLC0415

    sel = self.spec.selection
    s1, s2 = sparse.split_noise_multiplier(sigma_eff, sel.selection_fraction)
    return {"tables": ["/".join(t) for t in self.table_rows], "table_rows": self.total_rows,
            "shared": [["/".join(t) for t in g] for g in self.spec.shared],
            "selection_rows": sum(self.selection_rows.values()),
            "sigma_eff": sigma_eff, "selection_sigma": s1, "gradient_sigma": s2,
            "selection_fraction": sel.selection_fraction, "threshold_in_sigma1_c1": sel.threshold,
            "threshold": sel.absolute_threshold(s1), "count_clip": sel.count_clip, "max_rows": sel.max_rows,
            "max_touched": sel.max_touched}


def build(settings: SparseSettings, task_config: Any, shapes: Any) -> SparseRun | None:
  """The run's :class:`SparseRun` (None when ``sparse.enabled`` is off); checks the tables against ``shapes``.

  Raises:
    UsageError: no parameter matches ``sparse.tables``, or a matched one is not a table whose row ids the task
      gives.
  """
  if not settings.enabled:
    return None
  from dpmega import sparse  # noqa: PLC0415
  from dpmega.tasks import ctr as ctr_task  # noqa: PLC0415

  if task_config is None:
    raise UsageError("sparse.enabled=True needs the task's config (pass config_dict to the Trainer).")
  known = ctr_table_ids(ctr_task.model_config(task_config))
  leaves = {sparse.lazy.key_path(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  pattern = re.compile(settings.tables)
  matched = [p for p in leaves if pattern.search("/".join(p))]
  if not matched:
    raise UsageError(f"sparse.tables={settings.tables!r} matches no parameter; parameters: "
                     f"{['/'.join(p) for p in leaves]}.")
  unknown = [p for p in matched if p not in known or len(leaves[p]) != 2 or leaves[p][0] != known[p][0]]
  if unknown:
    raise UsageError(f"sparse.tables={settings.tables!r} matches {['/'.join(p) for p in unknown]}, which are not "
                     f"tables whose rows the batches give; tables: {['/'.join(p) for p in known if p in leaves]}.")
  selection = sparse.SelectionConfig(count_clip=settings.count_clip, threshold=settings.threshold,
                                     selection_fraction=settings.selection_fraction, max_rows=settings.max_rows,
                                     max_touched=settings.max_touched, threshold_in_noise_sd=True)
  by_source: dict[Any, list[Path]] = {}
  for p in matched:
    by_source.setdefault(known[p][2] if settings.share_selection else p, []).append(p)
  spec = sparse.SparseTables(tuple(matched), selection, shared=tuple(tuple(g) for g in by_source.values()
                                                                      if len(g) > 1))
  fns = [known[g[0]][1] for g in spec.groups()]
  return SparseRun(spec, {p: known[p][0] for p in matched}, lambda batch: [f(batch) for f in fns])


def check(settings: SparseSettings, task_config: Any) -> None:
  """:func:`build` on the model's shapes alone (no data, no compute): refuses a bad ``sparse.tables`` early."""
  if not settings.enabled:
    return
  from dpmega.models import ctr  # noqa: PLC0415
  from dpmega.tasks import ctr as ctr_task  # noqa: PLC0415

  try:
    model = ctr.make_model(ctr_task.model_config(task_config))
  except ValueError as e:
    raise UsageError(str(e)) from None
  build(settings, task_config, jax.eval_shape(ctr_task.make_init_params(model), jax.random.key(0)))


def count_coordinates(run: SparseRun | None) -> int:
  """Noise coordinates the selection adds per step: one count per row of each selection (0 without sparse tables;
  tables that share a selection count once)."""
  return 0 if run is None else sum(run.selection_rows.values())
