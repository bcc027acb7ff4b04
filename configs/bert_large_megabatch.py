"""DP-SGD pretraining of BERT-Large with mega-batches: the recipe of Anil et al. 2021.

R. Anil, B. Ghazi, V. Gupta, R. Kumar, P. Manurangsi, "Large-Scale
Differentially Private BERT", https://arxiv.org/abs/2108.01624 (Findings of
EMNLP 2022). Headline: masked-LM accuracy 60.5% at epsilon = 5.36 with batches
of about 2M examples and an increasing batch-size schedule, against about 70%
for non-private BERT-Large.

What this file takes from the paper (as stated in its abstract):
  * the model: BERT-Large (24 layers, hidden 1024, 16 heads), masked LM;
  * DP-SGD with mega-batches growing to about 2M examples per step;
  * the target epsilon = 5.36.
What the paper's abstract does not give, and we chose (NOT the paper's numbers;
check them against the paper before claiming a reproduction):
  * the ramp of the schedule (start size, doubling points), the number of steps;
  * delta (we take 1e-8, below 1 / dataset size as is usual);
  * the dataset size used for the privacy plan (``planning_dataset_size``):
    our order-of-magnitude estimate (3.3e7) of 128-token rows of English
    Wikipedia + BooksCorpus (BERT's pretraining data); the trainer uses the real
    ``len(train_source)`` when it runs;
  * the optimizer's hyper-parameters (Adam, as the paper's family of choice;
    learning rate and warmup are ours), the clip norm.
Sequence length 128 with 20 predictions per row is BERT's phase-1 setting
(Devlin et al. 2019).

Run it on an accelerator cluster (bf16 compute, f32 clipped sums; sharding by
``dpmega.sharding``) with a BERT ``vocab.txt`` and a TFDS text corpus:

  dpmega train --config configs/bert_large_megabatch.py \\
      --set task.vocab_path=/data/bert-uncased/vocab.txt task.tfds_data_dir=/data/tfds

Without data (CPU), its shapes and privacy plan build with ``jax.eval_shape``:
see ``tests/test_bert.py`` and ``accounting/``.
"""

from dpmega.train import config as config_lib
from dpmega.tasks import bert as bert_task

# The schedule doubles the batch every 200 steps from 2^16 to 2^21 ("2M" in
# the paper), then keeps it; few distinct sizes (few shapes to compile, few
# sampling rates to account). The same run is accounting/runs/dp_bert_megabatch.json.
BATCH_SCHEDULE = "steps:65536@1,131072@201,262144@401,524288@601,1048576@801,2097152@1001"  # ours
NUM_STEPS = 2_000  # ours
PLANNING_DATASET_SIZE = 33_000_000  # ours: order of magnitude only (see above)


def get_config():
  config = config_lib.base_config()
  config.task = bert_task.default_task_config()
  config.task.size = "large"
  config.task.dtype = "bfloat16"
  config.task.tie_embeddings = True
  config.task.seq_len = 128
  config.task.max_predictions = 20
  config.task.vocab_size = 30_522  # BERT uncased vocab.txt; the file's size wins when it is loaded
  config.task.source = "tfds"
  config.task.tfds_name = "wikipedia/20230601.en"
  config.task.tfds_train_split = "train[:99%]"
  config.task.tfds_eval_split = "train[99%:]"
  config.task.tfds_feature = "text"
  config.task.vocab_path = ""  # required: a BERT vocab.txt (uncased)
  config.task.max_eval_rows = 65_536
  config.task.eval_batch_size = 1024
  config.task.planning_dataset_size = PLANNING_DATASET_SIZE
  config.workdir = "runs/bert_large_megabatch"
  config.init_seed = 0  # public, parameter init only: noise and sampling use a fresh secret per run
  config.num_steps = NUM_STEPS
  config.batch_schedule = BATCH_SCHEDULE
  config.microbatch_size = 256  # per jitted vmap; memory is set by this, not by the 2M batch
  config.max_microbatches = 16
  config.clipping = "auto"
  config.clip_norm = 1.0
  config.target_epsilon = 5.36  # the paper's
  config.delta = 1e-8  # ours (the paper's delta is not in its abstract)
  config.accountant = "rdp"
  config.sampling = "poisson"
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3  # ours
  config.optimizer.schedule = "linear"
  config.optimizer.warmup_steps = 200  # ours
  config.optimizer.b2 = 0.99
  config.log_every = 10
  config.eval_every = 500
  config.checkpoint_every = 250
  return config
