"""Tests of dpmega/models/bert.py (the model, its per-example loss) and dpmega/tasks/bert.py (the bert_mlm
task, the configs)."""

import dataclasses
import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokenizers")

from dpmega import accounting  # noqa: E402
from dpmega import clipping  # noqa: E402
from dpmega.train import config as config_lib  # noqa: E402
from dpmega import tasks  # noqa: E402
from dpmega.data import text  # noqa: E402
from dpmega.data import wordpiece  # noqa: E402
from dpmega.models import bert  # noqa: E402
from dpmega.tasks import bert as bert_task  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECIAL = wordpiece.SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)


def _model(**overrides):
  cfg = bert.BertConfig.preset("tiny", vocab_size=64, max_len=16, **overrides)
  model = bert.BertMLM(cfg)
  return model, bert.init_params(model, jax.random.key(0), seq_len=16, max_predictions=3)


def _example(seed=0, t=16, p=3, n_real=12):
  rng = np.random.default_rng(seed)
  ids = np.zeros((t,), np.int32)
  ids[0] = SPECIAL.cls
  ids[1:n_real] = rng.integers(5, 64, n_real - 1)
  return {"input_ids": jnp.asarray(ids), "mlm_positions": jnp.asarray(rng.choice(np.arange(1, n_real), p, False)),
          "mlm_labels": jnp.asarray(rng.integers(5, 64, p)), "mlm_weights": jnp.ones((p,), jnp.float32)}


def test_per_example_loss_takes_one_row_and_matches_batched_forward():
  model, params = _model()
  examples = [_example(s) for s in range(3)]
  batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *examples)
  apply = jax.jit(lambda ids, pos: model.apply({"params": params}, ids, pos))
  batched = apply(batch["input_ids"], batch["mlm_positions"])
  for i, ex in enumerate(examples):
    one = apply(ex["input_ids"], ex["mlm_positions"])
    assert one.shape == (3, 64) and one.dtype == jnp.float32
    np.testing.assert_allclose(one, batched[i], rtol=1e-5, atol=1e-5)
  loss, aux = jax.jit(functools.partial(bert.mlm_loss, model))(params, examples[0])
  assert loss.shape == () and float(aux["count"]) == 3.0 and 0 <= float(aux["correct"]) <= 3


def test_padding_is_not_attended():
  # A row followed by [PAD]s gives the same logits as the same row with no padding.
  model, params = _model()
  ex = _example(n_real=10)
  apply = jax.jit(lambda ids, pos: model.apply({"params": params}, ids, pos))
  padded = apply(ex["input_ids"], ex["mlm_positions"])
  trimmed = apply(ex["input_ids"][:10], ex["mlm_positions"])
  np.testing.assert_allclose(padded, trimmed, rtol=1e-5, atol=1e-5)


def test_tied_head_reuses_word_embeddings_and_untied_has_its_own():
  _, tied = _model()
  _, untied = _model(tie_embeddings=False)
  assert "mlm_output" not in tied and "mlm_bias" in tied
  assert untied["mlm_output"]["kernel"].shape == (32, 64) and "mlm_bias" not in untied
  assert bert.param_count(untied) == bert.param_count(tied) + 32 * 64


def test_bfloat16_compute_keeps_float32_params_loss_and_clipped_sum():
  model32, params = _model()
  model16 = bert.BertMLM(dataclasses.replace(model32.config, dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  ex = _example()
  l32, _ = jax.jit(functools.partial(bert.mlm_loss, model32))(params, ex)
  l16, _ = jax.jit(functools.partial(bert.mlm_loss, model16))(params, ex)
  assert l16.dtype == jnp.float32
  assert abs(float(l16) - float(l32)) < 0.05 * abs(float(l32))
  batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_example(s) for s in range(4)])
  # f32 accumulation is the clipping engine's guarantee; vmap keeps this test's compile short.
  grad_sum, _, stats = jax.jit(lambda p, b: clipping.clipped_grad_sum(
      functools.partial(bert.mlm_loss, model16), p, b, clip_norm=1.0, has_aux=True, clipping="vmap"))(params, batch)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grad_sum))
  assert int(stats.num_examples) == 4 and int(stats.num_nonfinite) == 0


def test_row_without_predictions_has_zero_loss_and_zero_gradient():
  model, params = _model()
  ex = dict(_example(), mlm_weights=jnp.zeros((3,), jnp.float32))
  (loss, aux), grads = jax.jit(jax.value_and_grad(functools.partial(bert.mlm_loss, model), has_aux=True))(params, ex)
  assert float(loss) == 0.0 and float(aux["count"]) == 0.0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))


def test_each_example_contribution_norm_at_most_clip_for_bert():
  # The invariant of dpmega.clipping, on this model with the default mode:
  # one example alone gives a clipped sum of norm <= C.
  model, params = _model()
  loss = functools.partial(bert.mlm_loss, model)
  clipped = jax.jit(lambda p, b: clipping.clipped_grad_sum(loss, p, b, clip_norm=0.1, has_aux=True)[0])
  for s in range(3):
    g = clipped(params, jax.tree_util.tree_map(lambda x: x[None], _example(s)))
    norm = math.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree_util.tree_leaves(g)))
    assert norm <= 0.1 * (1 + 1e-4)


def test_untied_word_embedding_uses_sparse_row_clipping_and_matches_vmap():
  # With an untied head the input embedding is only a lookup: the default
  # clipping mode clips it from (ids, row gradients) (dpmega.clipping.rows), with
  # the same result as materialized per-example gradients.
  from dpmega.clipping import ghost  # pylint: disable=g-import-not-at-top

  model, params = _model(tie_embeddings=False)
  loss = functools.partial(bert.mlm_loss, model)
  plan = ghost.plan_layers(lambda p, ex: loss(p, ex)[0], params, _example())
  assert "['word_embeddings']['embedding']: ghost/rows" in plan.describe()
  batch = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[_example(s) for s in range(4)])
  sums = {mode: jax.jit(lambda p, b, mode=mode: clipping.clipped_grad_sum(
      loss, p, b, clip_norm=0.5, has_aux=True, clipping=mode)[0])(params, batch) for mode in ("auto", "vmap")}
  for a, b in zip(jax.tree_util.tree_leaves(sums["auto"]), jax.tree_util.tree_leaves(sums["vmap"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_model_config_is_rejected_naming_the_field():
  with pytest.raises(ValueError, match="size must be one of"):
    bert.BertConfig.preset("huge", vocab_size=10)
  with pytest.raises(ValueError, match="hidden_size must be a multiple of num_heads"):
    bert.BertConfig(vocab_size=10, hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="vocab_size must be a positive int"):
    bert.BertConfig(vocab_size=0)
  task = bert_task.default_task_config()
  task.size = "giant"
  with pytest.raises(ValueError, match="task.size must be one of"):
    bert_task.model_config(task, vocab_size=100)
  task = bert_task.default_task_config()
  task.mask_rate = 0.9
  with pytest.raises(ValueError, match=r"task.mask_rate must be a number in \(0, 0.5\]"):
    bert_task.masking_config(task)


def test_task_source_errors_name_the_field(tmp_path):
  config = config_lib.load_config(str(ROOT / "configs" / "bert_tiny_mlm.py"))
  config.task.cache_dir = str(tmp_path)
  config.task.source = "text"
  with pytest.raises(ValueError, match="task.train_files and task.eval_files"):
    bert_task.build_task(config)
  config.task.source = "tfds"
  config.task.tfds_name = "wikipedia"
  with pytest.raises(ValueError, match="task.vocab_path must be a BERT vocab.txt"):
    bert_task.build_task(config)
  config.task.source = "books"
  with pytest.raises(ValueError, match="task.source must be one of"):
    bert_task.build_task(config)


def test_text_source_with_user_vocab_txt_builds_a_task(tmp_path):
  # Plain text files + an existing BERT-format vocab.txt (here: one trained on
  # other text), no vocabulary training.
  corpus = text.prepare_stdlib_corpus(tmp_path / "c", vocab_size=512)
  docs = list(text.read_documents([corpus.eval]))
  (tmp_path / "train.txt").write_text("\n\n".join(docs[:300]))
  (tmp_path / "eval.txt").write_text("\n\n".join(docs[300:400]))
  config = config_lib.load_config(str(ROOT / "configs" / "bert_tiny_mlm.py"))
  config.task.update(source="text", train_files=(str(tmp_path / "train.txt"),),
                     eval_files=(str(tmp_path / "eval.txt"),), vocab_path=str(corpus.vocab),
                     cache_dir=str(tmp_path / "cache"))
  task = tasks.build_task(config)
  assert task.name == "bert_mlm" and task.has_aux and len(task.train_source) > 50
  batch = task.prepare_batch(task.train_source.take(np.arange(4)), jax.random.key(0))
  assert batch["input_ids"].shape == (4, 32) and batch["mlm_positions"].shape == (4, 5)
  params = task.init_params(jax.random.key(0))
  metrics = task.evaluate(params)
  assert set(metrics) == {"mlm_accuracy", "mlm_loss", "unigram_accuracy"}
  assert abs(metrics["mlm_loss"] - math.log(512)) < 0.5  # untrained: about uniform


def test_tiny_bert_trains_privately_above_the_unigram_baseline(tmp_path):
  # examples/bert_mlm.py: configs/bert_tiny_mlm.py through dpmega.train (Poisson
  # sampling, clipping, one noise draw per step, accountant), fixed sigma,
  # constant batch, one layer to halve the CPU time.
  spec = importlib.util.spec_from_file_location("bert_mlm_example", ROOT / "examples" / "bert_mlm.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  result = example.main(["--steps", "90", "--batch", "256", "--noise_multiplier", "0.5", "--num_layers", "1",
                         "--cache_dir", str(tmp_path), "--quiet"])
  assert result["steps"] == 90 and result["noise_multiplier"] == 0.5
  assert math.isfinite(result["epsilon"]) and result["epsilon"] > 0
  assert result["unigram_accuracy"] > 0.02
  assert result["mlm_accuracy"] > result["unigram_accuracy"] + 0.015, result
  assert len(result["filled"]) == 2


def test_large_config_builds_abstract_shapes_and_privacy_plan_without_allocating():
  config = config_lib.load_config(str(ROOT / "configs" / "bert_large_megabatch.py"))
  cfg = config_lib.validate(config)
  shapes = bert_task.abstract_params(config.task, vocab_size=config.task.vocab_size)
  leaves = jax.tree_util.tree_leaves(shapes)
  assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jnp.float32 for x in leaves)
  n = bert.param_count(shapes)
  # BERT-Large is ~335M with segment embeddings and pooler, which MLM-only omits.
  assert 330e6 < n < 336e6, n
  assert shapes["layer_23"]["intermediate"]["kernel"].shape == (1024, 4096)
  assert shapes["word_embeddings"]["embedding"].shape == (30522, 1024)

  sizes = cfg.batch_schedule.batch_sizes(cfg.num_steps)
  assert sizes.max() == 2**21 and sizes[0] < sizes[-1] and np.all(np.diff(sizes) >= 0)
  n_data = config.task.planning_dataset_size
  sigma = accounting.calibrate_noise_multiplier(
      target_epsilon=cfg.target_epsilon, delta=cfg.delta, dataset_size=n_data, batch_sizes=cfg.batch_schedule,
      num_steps=cfg.num_steps, scheme=cfg.sampling, accountant=cfg.accountant)
  eps = accounting.epsilon_for_schedule(noise_multiplier=sigma, delta=cfg.delta, dataset_size=n_data,
                                        batch_sizes=cfg.batch_schedule, num_steps=cfg.num_steps,
                                        scheme=cfg.sampling, accountant=cfg.accountant)
  assert cfg.target_epsilon == 5.36
  assert 5.3 < eps <= 5.36
  assert 0.3 < sigma < 10
