"""Private DeepFM on Criteo-format data.

  dpmega train --config configs/ctr_deepfm.py          # small: generated data, ~1-2 min on 2 CPU cores
  dpmega train --config configs/ctr_deepfm.py:kaggle   # Criteo Kaggle, after converting it once with
  dpmega criteo-convert --layout kaggle --root DIR_WITH_TRAIN_TXT --out data/criteo_kaggle

Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network for CTR
Prediction" (https://arxiv.org/abs/1703.04247): first-order terms, a
factorization machine over the field embeddings and an MLP sharing them. Their
Criteo setting (Section 3.1): embedding size 10, three hidden layers of 400
ReLU units (they also used dropout 0.5, which we leave out: per-example
clipping and noise already regularize, and dropout needs a per-example key).

Kaggle variant size: 26 x 2**20 x (10 + 1) = 300M table parameters (1.2 GB float32;
~3.6 GB with Adam's two moments).

Clipping recipe: flat C = 20 with Adam at 0.01 (configs/common/ctr.py, whose docstring has the measurements).
"""

import pathlib
import runpy

# The settings the CTR configs share: configs/common/ctr.py.
_COMMON = runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "common" / "ctr.py"))


def get_config(variant=None):
  config = _COMMON["ctr_config"]("ctr_deepfm", variant)
  m = config.task.model
  if variant == "kaggle":
    m.embed_dim = 10
    m.mlp_dims = (400, 400, 400)
  else:
    m.embed_dim = 8
    m.mlp_dims = (64, 32)
  return config
