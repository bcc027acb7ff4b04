"""Sparsity-preserving DP-SGD for embedding tables: private row selection, sparse noise, lazy optimizer updates.

Modules, imports going one way down this list:

* :mod:`~dpmega.sparse.selection`: clipped row-touch counts, the noisy
  threshold with a static cap, the accounting (``σ_eff``) and the ``(σ1, σ2)`` split;
* :mod:`~dpmega.sparse.lazy`: an elementwise optax transformation applied to
  the selected rows only;
* :mod:`~dpmega.sparse.counts`: the counts of a logical batch on the mesh,
  chunk by chunk (dense, or compact: the touched rows only); the CTR models' row ids;
* :mod:`~dpmega.sparse.noisy_update`: the step's release (selection, then
  noise on dense leaves and selected rows).

Reference: Ghazi et al. 2023, "Sparsity-Preserving Differentially Private
Training of Large Embedding Models" (DP-AdaFEST), https://arxiv.org/abs/2311.08357
"""

from dpmega.sparse.counts import RowCounts, TouchedRowCounts, ctr_row_ids, make_count_fn, to_dense, zero_counts
from dpmega.sparse.lazy import lazy_update
from dpmega.sparse.noisy_update import SparseRelease, SparseTables, sparse_privatize, sparse_step
from dpmega.sparse.selection import (Selection, SelectionConfig, clipped_row_counts, clipped_row_touches,
                                     effective_noise_multiplier, select_rows, select_touched_rows,
                                     split_noise_multiplier)

__all__ = [
    "RowCounts", "Selection", "SelectionConfig", "SparseRelease", "SparseTables", "TouchedRowCounts",
    "clipped_row_counts", "clipped_row_touches", "ctr_row_ids", "effective_noise_multiplier", "lazy_update",
    "make_count_fn", "select_rows", "select_touched_rows", "sparse_privatize", "sparse_step",
    "split_noise_multiplier", "to_dense", "zero_counts",
]
