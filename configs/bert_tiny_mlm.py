"""Private masked-LM pretraining of a tiny BERT on CPU: the recipe of Anil et al. 2021, shrunk.

  dpmega train --config configs/bert_tiny_mlm.py
  dpmega train --config configs/bert_tiny_mlm.py --target_epsilon 2 --set num_steps=40

Data: the docstrings of the running Python's standard library (real English,
offline everywhere, nothing shipped), packed into rows of 32 WordPiece tokens
(about 16k training rows on Python 3.11), with a 512-token vocabulary trained
on them. The text is public here; on private text, pass a public ``vocab.txt``
(``--set task.vocab_path=...``): a vocabulary trained on private text is not
covered by the DP guarantee. The vocabulary is
small so that words split into pieces that context predicts: a tiny model
gets past the unigram baseline within a few CPU-minutes. Everything is built
once under ``$DPMEGA_CACHE_DIR`` (default ``~/.cache/dpmega``).

As in the paper (https://arxiv.org/abs/2108.01624): DP-SGD with Poisson
sampling, Adam, and the noise calibrated to the target epsilon for the whole
schedule before step 1. The sizes are ours, chosen to run in about a minute on
2 cores. The batch is constant: what the issue-20 sweeps (bench/RESULTS.md)
found best at this scale. The paper's increasing schedule
(``--set batch_schedule=geometric:256->1024 --set optimizer.b2=0.95``; a
shorter memory of Adam's second moment forgets the small early batches'
noise, as the plan's note says) pays where the runs are noise-limited
(final batches of 8,192 and more on the 142k-row packages corpus: the
fixed batch's accuracy with 64% of its examples); at this demo's size it
reached 0.105 MLM accuracy in 120 steps (0.098 with b2 = 0.999) against
0.118 for the constant batch, with half the examples and, on CPU, about
twice the wall time (its small batches run at 3-5k examples/s against 6k,
and it compiles four chunk shapes instead of one).
"""

from dpmega.train import config as config_lib
from dpmega.tasks import bert as bert_task


def get_config():
  config = config_lib.base_config()
  config.task = bert_task.default_task_config()
  config.task.size = "tiny"
  config.task.seq_len = 32
  config.task.vocab_size = 512
  # "packages": the installed packages' docstrings (142k rows, bench/RESULTS.md, issue 20); stdlib builds faster.
  config.task.source = "stdlib"
  config.workdir = "runs/bert_tiny_mlm"
  config.init_seed = 0  # public, parameter init only: noise and sampling use a fresh secret per run
  config.num_steps = 120
  config.batch_schedule = "constant:1024"  # the private peak of the batch sweep (bench/RESULTS.md, issue 20)
  config.microbatch_size = 128
  config.max_microbatches = 8
  config.clipping = "auto"
  config.clip_norm = 1.0
  config.target_epsilon = 5.36  # the paper's headline epsilon
  config.delta = 1e-5  # < 1 / (number of training rows)
  config.accountant = "rdp"
  config.sampling = "poisson"
  config.optimizer.name = "adam"
  # Best of {3e-3, 1e-2, 3e-2} at B >= 512 in every issue-20 sweep; at B = 256 over 1,024 steps 3e-3 was better.
  config.optimizer.learning_rate = 1e-2
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.log_every = 10
  config.eval_every = 40
  config.checkpoint_every = 0
  return config
