"""The run settings that configs/ctr_wide_deep.py, ctr_deepfm.py and ctr_dlrm.py share (not a config itself).

Each of those files loads this one (``runpy.run_path``, so it works wherever
``dpmega train --config`` is run from) and calls :func:`ctr_config`, then sets
its model's shape. Two variants:

* ``None`` or ``"small"``: generated Criteo-format data
  (:mod:`dpmega.data.criteo_synthetic`), small tables, about a minute on 2 CPU
  cores.
* ``"kaggle"``: Criteo Kaggle (``train.txt`` converted once with ``dpmega
  criteo-convert --layout kaggle --root DIR --out data/criteo_kaggle``; the last
  1/7, one day, is the evaluation split), hashed tables of 2**20 rows per
  feature, sparse ("auto") clipping, mega-batches. Not run here.

Clipping recipe (measured by bench/ctr_utility.py at the issue's size: 10^6 generated
rows, DeepFM, epsilon 3, batch 4,096, 1 epoch, one seed each): flat per-example clipping at C = 20 with Adam at
0.01 stays the default, because no clipping option beat it on both ranking and calibration. Recipe: AUC 0.8225,
NE 0.762. Adaptive clip norm (Andrew et al.) to the 0.9 quantile: 0.8223 / 0.764 (a tie, with an extra
accounted release); to the median: 0.8103 / NE 1.91 (clipping half of the examples gives every one the same
push, the 75% negatives win: mean prediction 0.05 for a base rate 0.25). Clip groups tables/dense 0.5/0.5:
0.722 / NE 1.54. Normalized ("automatic") clipping: the best ranking, 0.8317, but NE 1.56 (ECE 0.15) for the
same reason, so it is unusable for pricing unless followed by a private recalibration. That is now built
(``recalibration.*``, on by default here), but at 10^6 rows, 12 epochs, batch 16,384, eps 8, normalized clipping +
20 recalibration steps reached AUC 0.8484 and NE 0.816 against flat clipping's 0.8517 and 0.704, so flat stays.
"""

import ml_collections

from dpmega.tasks import ctr as ctr_task
from dpmega.train import config as config_lib


def ctr_config(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """Trainer + task fields of the CTR task ``name`` (``ctr_wide_deep``, ``ctr_deepfm``, ``ctr_dlrm``)."""
  if variant not in (None, "", "small", "kaggle"):
    raise ValueError(f"config variant must be 'small' or 'kaggle', got {variant!r}.")
  c = config_lib.base_config()
  c.task = ctr_task.default_task_config(name)
  c.workdir = f"runs/{name}"
  c.clip_norm = 1.0
  c.target_epsilon = 3.0
  c.delta = 1e-6
  c.sampling = "poisson"
  c.accountant = "rdp"
  c.clipping = "auto"  # sparse per-example clipping of the lookups: no B x V x d tensor
  c.optimizer.name = "adam"
  c.optimizer.schedule = "cosine"
  c.log_every = 10
  if variant == "kaggle":
    c.task.data.train_dir = "data/criteo_kaggle"
    c.task.data.eval_fraction = 1 / 7
    c.task.data.eval_max_rows = 0
    c.task.data.eval_batch_size = 65_536
    c.task.model.buckets = 2**20
    c.task.model.cross_buckets = 2**22
    c.num_steps = 1_800  # ~3 epochs of the ~39.3M training rows at 65,536 per step
    c.batch_schedule = "constant:65536"
    c.microbatch_size = 2_048
    c.max_microbatches = 8
    c.delta = 1e-8  # < 1 / 39.3M training rows
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.eval_every = 300
    c.checkpoint_every = 300
    c.recalibration.steps = 20  # private temperature + bias after training: ~1% more accounted steps
  else:
    c.task.data.synthetic_rows = 50_000
    c.task.data.synthetic_eval_rows = 10_000
    c.task.data.synthetic_vocab = 0
    c.task.model.buckets = 1_000
    c.task.model.cross_buckets = 4_096
    c.num_steps = 60
    c.microbatch_size = 256
    c.max_microbatches = 8
    c.delta = 1e-5  # < 1 / 50,000 training rows
    # Recipe measured in bench/ctr_utility.py (issue 18). The per-example gradient norms of these models are
    # ~7-25 at initialization: at C = 1 every example is clipped, each pushes the logits with the same force
    # whatever its error, the 75% negatives win and the logits drift to -5 (normalized entropy 1.7, mean
    # prediction 0.12 for a base rate 0.25). C = 20 clips a minority; with Adam at 0.01 the private DeepFM
    # reached NE 0.81 at epsilon 3 (50k rows, 60 steps of 2,048). DP-AdamBC (optimizer.name = "adam_bc",
    # floor 1e-4 ~ (sigma C / B)^2) tied with it there (AUC 0.7938 vs 0.7930); Adam stays the default since it
    # needs no noise-dependent floor (a floor that suits the private arm slows the non-private one).
    # At 10^6 rows (issue 18, session 5) adaptive clipping, clip groups and normalized clipping were measured against
    # this flat C = 20: none beat it on both AUC and calibration (numbers in this module's docstring).
    c.clip_norm = 20.0
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 0.01
    c.batch_schedule = "constant:2048"
    c.optimizer.warmup_steps = 5
    c.eval_every = 0
    # Private recalibration (issue 18, dpmega.train.recalibration): 10 more accounted steps fit a temperature and
    # a bias; the private models are over-confident (temperature ~0.84-0.95). Measured on this variant at
    # epsilon 3, 2 init seeds: NE 0.8147 / 0.8193 without, 0.8106 / 0.8117 with 10 steps (sigma 0.976 -> 0.997,
    # AUC unchanged: 0.7885 / 0.7871 -> 0.7895 / 0.7899); 20 steps cost more sigma for no further gain here.
    c.recalibration.steps = 10
  return c
