"""Private Wide & Deep on Criteo-format data.

  dpmega train --config configs/ctr_wide_deep.py          # small: generated data, ~1-2 min on 2 CPU cores
  dpmega train --config configs/ctr_wide_deep.py:kaggle   # Criteo Kaggle, after converting it once with
  dpmega criteo-convert --layout kaggle --root DIR_WITH_TRAIN_TXT --out data/criteo_kaggle

Cheng et al. 2016, "Wide & Deep Learning for Recommender Systems"
(https://arxiv.org/abs/1606.07792): a linear ("wide") model over the ids and
hashed cross products of feature pairs, plus a "deep" MLP over the embeddings;
trained jointly. Their Google Play model used 32-dimensional embeddings and
ReLU layers of 1024, 512 and 256 units; Criteo has no documented cross
features, so we cross consecutive pairs of categorical features (C1 x C2, C3 x
C4, ...; ``task.model.num_crosses``) into one hashed table.

Kaggle variant size: 26 x 2**20 x (32 + 1) + 2**22 = 904M table parameters
(3.6 GB float32; ~11 GB with Adam's two moments).
"""

import pathlib
import runpy

# The settings the CTR configs share: configs/common/ctr.py.
_COMMON = runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "common" / "ctr.py"))


def get_config(variant=None):
  config = _COMMON["ctr_config"]("ctr_wide_deep", variant)
  m = config.task.model
  m.num_crosses = 8
  if variant == "kaggle":
    m.embed_dim = 32
    m.mlp_dims = (1024, 512, 256)
  else:
    m.embed_dim = 8
    m.mlp_dims = (64, 32)
  return config
