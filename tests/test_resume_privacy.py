"""Resume and rewind never replay noise on another computation; the workdir's epsilon never decreases.

Issue 14 parts 3-4: the checkpoint fingerprint, generations (new keys for any
recomputation), the spent-privacy journal, and the removed data-dependent halt.
"""

import json
import os

import numpy as np
import pytest

from dpmega import accounting
from dpmega.train import config as config_lib
from dpmega.accounting import journal as journal_lib
from dpmega import train as train_lib
from dpmega.train.checkpoint import Checkpointer
from dpmega.train.checkpoint import CheckpointError
from dpmega.data.sources import ArraySource
from dpmega.data.sources import fingerprint
from dpmega.tasks import build_task
from tests.interrupts import Interrupt
from tests.interrupts import interrupt_at

from tests import train_configs


# Runs compared bit for bit: a public seed (tests only).
_RUN = ("num_steps=4", "checkpoint_every=1", "keep_checkpoints=10", "insecure_reproducible_seed=7",
        "optimizer.learning_rate=0.5", "log_every=0", "tensorboard=False")


def _config(tmp_path, *overrides, name="run"):
  return train_configs.linear_task_config(tmp_path / name, *_RUN, *overrides)


def _params_at(config, step, directory="checkpoints"):
  trainer = train_lib.Trainer(config_lib.validate(config), build_task(config), out=lambda s: None,
                              config_dict=config)
  with Checkpointer(os.path.join(config.workdir, directory)) as ckpt:
    tree, meta = ckpt.restore(trainer._checkpoint_tree(trainer.initial_state()), step=step)  # pylint: disable=protected-access
  return np.asarray(tree["params"]["w"]), meta


def _epsilon_of_steps(n, config):
  cfg = config_lib.validate(config)
  ledger = accounting.Ledger()
  ledger.record(batch_size=32, dataset_size=256, noise_multiplier=cfg.noise_multiplier, scheme=cfg.sampling, steps=n)
  return accounting.compute_epsilon(ledger, cfg.delta, cfg.accountant)


def test_issue_reproduction_resume_on_other_data_and_computation_is_refused_naming_the_fields(tmp_path):
  # The issue: `--resume_step 2 --set task.data_seed=999 clipping=vmap microbatch_size=125` was accepted and
  # redid steps 3-4 with the same keys and indices on other data.
  path = tmp_path / "tiny.py"
  path.write_text(train_configs.small_train_config(num_train=2000, num_eval=200, num_steps=4))
  config = config_lib.apply_overrides(config_lib.load_config(str(path)),
                                      [f"workdir={tmp_path / 'run'}", "checkpoint_every=1"])
  train_lib.train(config, out=lambda s: None)
  changed = config_lib.apply_overrides(config, ["task.data_seed=999", "clipping=vmap", "microbatch_size=125"])
  with pytest.raises(CheckpointError) as e:
    train_lib.train(changed, resume_step=2, out=lambda s: None)
  for field in ("task.data_seed", "dataset.content", "clipping", "microbatch_size"):
    assert field in str(e.value), str(e.value)
  with Checkpointer(os.path.join(config.workdir, "checkpoints")) as ckpt:
    assert ckpt.steps()[-1] == 4  # refused before anything was set aside or recomputed


def test_same_content_gives_the_same_dataset_fingerprint_and_one_changed_value_another():
  x = np.arange(12.0).reshape(6, 2)
  a = fingerprint(ArraySource({"x": x}))
  assert a == fingerprint(ArraySource({"x": x.copy()}))
  y = x.copy()
  y[3, 1] += 1e-6  # one coordinate of one example
  assert fingerprint(ArraySource({"x": y}))["content"] != a["content"]


def test_rewind_draws_new_noise_and_epsilon_counts_the_discarded_steps(tmp_path):
  config = _config(tmp_path, "task.kind='zero'")  # every update is pure noise: equal updates = equal keys
  first = train_lib.train(config, out=lambda s: None)
  p2, _ = _params_at(config, 2)
  p3_first, meta3 = _params_at(config, 3)
  assert meta3["generation"] == 0
  lines = []
  rewound = train_lib.train(config, resume_step=2, out=lines.append)
  p3_again, meta3_again = _params_at(config, 3)
  assert meta3_again["generation"] == 1
  # Same data, same computation, but step 3 is redone with a new key.
  assert not np.array_equal(p3_again - p2, p3_first - p2)
  assert np.all(p3_first - p2 != 0) and np.all(p3_again - p2 != 0)
  # The discarded steps 3-4 stay spent: 4 + 2 distinct (generation, step), never less than before.
  assert rewound.epsilon >= first.epsilon
  assert rewound.spent.num_steps == 6 and rewound.ledger.num_steps == 4
  assert rewound.epsilon == pytest.approx(_epsilon_of_steps(6, config), rel=1e-6)
  assert rewound.trajectory_epsilon == pytest.approx(first.epsilon, rel=1e-9)
  resumed_line = next(line for line in lines if line.startswith("resumed from"))
  assert f"{_epsilon_of_steps(4, config):.4g}" in resumed_line  # the total, not the 2-step prefix
  assert f"{_epsilon_of_steps(2, config):.4g}" in resumed_line  # ... and the prefix, labelled as such
  assert any("generation 1" in line and "rewind" in line for line in lines)
  summary = json.load(open(os.path.join(config.workdir, "summary.json")))
  assert summary["epsilon"] == rewound.epsilon and summary["spent_steps"] == 6 and summary["generation"] == 1


def test_crash_resume_is_bit_identical_and_spends_nothing_new(tmp_path):
  full = train_lib.train(_config(tmp_path, "num_steps=6", "checkpoint_every=2", name="full"), out=lambda s: None)
  config = _config(tmp_path, "num_steps=6", "checkpoint_every=2", "log_every=1", name="cut")
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(5))  # step 5 computed and journaled; last checkpoint at 4
  assert len(journal_lib.Journal(config.workdir)) == 5
  resumed = train_lib.train(config, resume=True, out=lambda s: None)
  assert resumed.generation == 0
  assert np.asarray(resumed.params["w"]).tobytes() == np.asarray(full.params["w"]).tobytes()
  assert resumed.spent.num_steps == 6 and resumed.epsilon == full.epsilon


def test_resume_with_a_new_learning_rate_is_allowed_in_a_new_generation(tmp_path):
  config = _config(tmp_path, "checkpoint_every=2", "log_every=1")
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(3))  # steps 1-3 spent; checkpoint at 2
  lines = []
  changed = config_lib.apply_overrides(config, ["optimizer.learning_rate=0.05"])
  result = train_lib.train(changed, resume=True, out=lines.append)
  assert result.generation == 1 and result.steps == 4
  assert any("optimizer.learning_rate" in line for line in lines)
  assert result.spent.num_steps == 5  # (0, 1..3) and (1, 3..4)
  assert result.epsilon == pytest.approx(_epsilon_of_steps(5, config), rel=1e-6)


def test_resume_without_a_journal_is_refused(tmp_path):
  config = _config(tmp_path, "num_steps=2")
  train_lib.train(config, out=lambda s: None)
  os.remove(os.path.join(config.workdir, journal_lib.FILENAME))
  with pytest.raises(CheckpointError, match="no journal"):
    train_lib.train(config, resume=True, out=lambda s: None)


def test_nonfinite_examples_do_not_stop_the_run_they_are_zeroed_and_counted(tmp_path):
  # The removed halt ("every sampled example had a non-finite gradient") was a decision on raw private data.
  config = _config(tmp_path, "task.kind='nan'", "num_steps=3")
  result = train_lib.train(config, out=lambda s: None)
  assert result.steps == 3
  assert all(r["nonfinite"] == r["sampled"] > 0 for r in result.history)
  assert np.all(np.isfinite(result.params["w"])) and np.any(result.params["w"] != 0)  # noise only


def test_journal_ignores_a_torn_last_line_and_refuses_a_damaged_one(tmp_path):
  j = journal_lib.Journal(str(tmp_path))
  j.start_generation(0, from_step=0, from_generation=None, fingerprint="f", reason="a new run")
  assert j.record_step(generation=0, step=0, batch_size=8, dataset_size=64, noise_multiplier=1.0, scheme="poisson")
  assert not j.record_step(generation=0, step=0, batch_size=8, dataset_size=64, noise_multiplier=1.0,
                           scheme="poisson")  # a replay spends nothing new
  with open(j.path, "a") as f:
    f.write('{"kind": "step", "generation": 0, "st')  # killed mid-write: that step was not computed
  again = journal_lib.Journal(str(tmp_path))
  assert len(again) == 1
  again.record_step(generation=0, step=1, batch_size=8, dataset_size=64, noise_multiplier=1.0, scheme="poisson")
  assert len(journal_lib.Journal(str(tmp_path))) == 2 and journal_lib.Journal(str(tmp_path)).ledger().num_steps == 2
  with open(j.path) as f:
    lines = f.read().split("\n")
  lines[1] = lines[1][:10]  # damage a middle record
  with open(j.path, "w") as f:
    f.write("\n".join(lines))
  with pytest.raises(journal_lib.JournalError, match="line 2"):
    journal_lib.Journal(str(tmp_path))
