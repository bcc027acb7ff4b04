"""Private DLRM-style CTR model on Criteo-format data.

  dpmega train --config configs/ctr_dlrm.py            # small: generated data, ~1-2 min on 2 CPU cores
  dpmega train --config configs/ctr_dlrm.py:kaggle     # Criteo Kaggle, after converting it once with
  dpmega criteo-convert --layout kaggle --root DIR_WITH_TRAIN_TXT --out data/criteo_kaggle

Architecture from Naumov et al. 2019, "Deep Learning Recommendation Model for
Personalization and Recommendation Systems" (https://arxiv.org/abs/1906.00091):
bottom MLP on the 13 dense features to the embedding width, pairwise dot
products of all 27 fields, top MLP. The Kaggle variant uses the reference
implementation's Criteo-Kaggle shape (facebookresearch/dlrm,
``--arch-sparse-feature-size=16 --arch-mlp-bot=13-512-256-64-16
--arch-mlp-top=512-256-1``), with every table hashed to 2**20 rows.

Kaggle variant size: 26 x 2**20 x 16 = 436M table parameters (1.7 GB float32;
~5.2 GB with Adam's two moments); noise is drawn for every coordinate at every step.

Clipping recipe: flat C = 20 with Adam at 0.01 (configs/common/ctr.py, whose docstring has the measurements).
"""

import pathlib
import runpy

# The settings the CTR configs share: configs/common/ctr.py.
_COMMON = runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "common" / "ctr.py"))


def get_config(variant=None):
  config = _COMMON["ctr_config"]("ctr_dlrm", variant)
  m = config.task.model
  if variant == "kaggle":
    m.embed_dim = 16
    m.bottom_mlp_dims = (512, 256, 64)  # + the last layer of width embed_dim (16)
    m.mlp_dims = (512, 256)  # + the logit layer
  else:
    m.embed_dim = 8
    m.bottom_mlp_dims = (32,)
    m.mlp_dims = (64, 32)
  return config
