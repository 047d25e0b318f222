"""Recipe keys shown by what the run's own code builds from them, in one process (no training loop): the build step
(training/build.py, training/pipeline.py build_stage), the loader, the synthetic dataset, the stage eval and the
final summary. tests/unit/test_recipe_schema.py maps every key of the schema to a test; these are the ones that
needed a real build to show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launching import small_synth_shards
from omni_moe.training.recipe import load_recipe

RECIPE = "tests/distributed/loop_recipe.yaml"
ONE_PROCESS = ["run.nproc_per_node=1", "parallel.ep_size=1"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    return small_synth_shards(tmp_path_factory.mktemp("synth"), num=22, per_shard=11)


def recipe_for(synth: dict, output, *overrides: str):
    return load_recipe(RECIPE, [f"run.output_dir={output}", f"model.tokenizer.bpe_from={synth['manifest']}",
                                f"data.sources.synth={synth['shards']}", "data.samples_per_epoch=8", *ONE_PROCESS,
                                *overrides])


@pytest.fixture(scope="module")
def built(synth, tmp_path_factory):
    from omni_moe.training.pipeline import build_stage

    output = tmp_path_factory.mktemp("run")
    recipe = recipe_for(synth, output, "model.config.hidden_size=32", "model.tokenizer.vocab_size=300")
    return recipe, build_stage(recipe, 0)


def test_build_stage_follows_run_model_and_data_keys(built, synth, tmp_path):
    from omni_moe.training.build import load_tokenizer

    recipe, stage = built
    output_dir = recipe.run.output_dir
    # model.tokenizer {bpe_from, vocab_size}: a BPE trained on that manifest, saved under run.output_dir
    assert (Path(output_dir) / "tokenizer" / "tokenizer_config.json").is_file()
    assert len(stage.tokenizer) <= 300 + 16  # vocab_size merges target plus the special tokens
    bigger = load_tokenizer(recipe_for(synth, tmp_path / "bigger", "model.tokenizer.vocab_size=340"), None)
    assert len(bigger) > len(stage.tokenizer)
    assert (tmp_path / "bigger" / "tokenizer" / "tokenizer_config.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"model\.tokenizer\.bpe_from"):
        load_tokenizer(recipe_for(synth, tmp_path / "none", f"model.tokenizer.bpe_from={tmp_path}/missing.jsonl"),
                       None)
    # model.config: the fields given, the vocabulary and placeholder ids from the tokenizer
    assert stage.model.config.hidden_size == 32 and stage.model.config.num_intra_experts == 2
    assert stage.model.config.vocab_size == len(stage.tokenizer)
    assert stage.model.model.embed_tokens.weight.shape == (len(stage.tokenizer), 32)


def test_run_seed_sets_the_initial_weights(built, synth):
    from omni_moe.training.pipeline import build_stage

    recipe, stage = built
    output = recipe.run.output_dir  # the tokenizer is already there
    again = build_stage(recipe_for(synth, output, "model.config.hidden_size=32", "model.tokenizer.vocab_size=300"),
                        0)
    other = build_stage(recipe_for(synth, output, "model.config.hidden_size=32", "model.tokenizer.vocab_size=300",
                                   "run.seed=1"), 0)
    want, same, different = (dict(s.model.named_parameters()) for s in (stage, again, other))
    assert all(torch.equal(want[k], same[k]) for k in want)
    moved = [k for k in want if not torch.equal(want[k], different[k])]
    assert len(moved) > len(want) // 2, f"run.seed=1 changed only {moved}"


def _epoch(loader) -> list:
    """One epoch of OmniBatches (data/collate.py)."""
    return list(loader)


def test_loader_follows_the_data_section_and_the_stage_mix(built, synth, tmp_path):
    from omni_moe.data.batching import make_batching
    from omni_moe.training.build import build_loader

    _, stage = built

    def loader(*overrides: str):
        recipe = recipe_for(synth, tmp_path, *overrides)
        return build_loader(recipe, recipe.stages[0], stage.processor, 0)

    mix = ["data.sources={a: %s, b: [%s]}" % (synth["shards"], synth["shards"]),
           "stages=[{name: mix, preset: modality_experts, steps: 1, data: [{source: a, weight: 3.0}, "
           "{source: b, weight: 1.0}]}]"]
    settings = ["data.samples_per_epoch=6", "data.batching={strategy: mixed, batch_size: 2}", "data.max_length=200",
                "data.shuffle_buffer=4"]
    plain = loader(*mix, *settings, "data.num_workers=0")
    # data.sources and the stage's data mix
    assert plain.dataset.source_names == ["a", "b"] and plain.dataset.weights == [3.0, 1.0]
    assert plain.dataset.source_shards["a"] == plain.dataset.source_shards["b"] and plain.dataset.source_shards["a"]
    # data.batching: the strategy the recipe names, rows per batch = batch_size
    assert type(plain.batching) is type(make_batching(strategy="mixed", batch_size=2)) and plain.batch_size == 2
    batches = _epoch(plain)
    # data.samples_per_epoch: 6 samples per rank and epoch, in batches of 2; data.max_length caps every row
    assert [b.num_samples for b in batches] == [2, 2, 2]
    assert plain.collate_fn.max_length == 200 and all(b.inputs["input_ids"].shape[1] <= 200 for b in batches)
    # data.num_workers: reader processes of the loader; data.shuffle_buffer: the reader's shuffle window
    assert loader(*mix, "data.num_workers=2").num_workers == 2 and plain.num_workers == 0
    assert plain.dataset.shuffle_buffer == 4
    # data.seed: the same seed gives the same samples in the same order, another seed another order
    order = [b.sample_ids for b in batches]
    assert [b.sample_ids for b in _epoch(loader(*mix, *settings))] == order
    assert [b.sample_ids for b in _epoch(loader(*mix, *settings, "data.seed=7"))] != order
    # token_budget: rows x padded length within max_tokens, at most max_batch_size rows; lookahead: the buffer
    budget = loader("data.batching={strategy: token_budget, max_tokens: 600, lookahead: 5, max_batch_size: 2}")
    assert (budget.batching.max_tokens, budget.batching.lookahead, budget.batching.max_batch_size) == (600, 5, 2)
    shapes = [tuple(b.inputs["input_ids"].shape) for b in _epoch(budget)]
    assert shapes and all(rows * length <= 600 and rows <= 2 for rows, length in shapes), shapes
    # packing: rows of whole samples up to data.batching.max_length tokens, batch_size rows a batch
    packed = _epoch(loader("data.batching={strategy: mixed, batch_size: 2, packing: true, max_length: 256}"))
    assert packed and all(b.packed and b.inputs["input_ids"].shape[0] <= 2 for b in packed)
    assert all(b.inputs["input_ids"].shape[1] <= 256 for b in packed)
    assert sum(b.num_samples for b in packed) > sum(b.inputs["input_ids"].shape[0] for b in packed)  # rows shared


def test_model_from_loads_the_named_folder(tmp_path):
    from tests.tiny import save_tiny_omni_folder
    from omni_moe.training.build import build_model, plan_model

    folder = save_tiny_omni_folder(tmp_path / "tiny", seed=3)
    recipe = load_recipe(RECIPE, ["model.config=null", "model.tokenizer=null", f"model.from={folder}", *ONE_PROCESS,
                                  f"run.output_dir={tmp_path / 'run'}"])
    assert recipe.model.from_ == str(folder)
    plan = plan_model(recipe, recipe.stages[0])
    assert plan.kind == "folder" and plan.folder == str(folder)
    model = build_model(plan, torch.float32)
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    saved = OmniMoeForCausalLM.from_pretrained(str(folder))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved.parameters()))


def test_model_dense_and_upcycle_plan_the_stage_models():
    """recipes/tiny_omni.yaml: a dense_pretrain stage trains the LLM model.dense describes; the next stage upcycles
    it with model.upcycle's MoE fields (planned from config files alone, before the dense stage has run)."""
    from omni_moe.training.build import plan_model

    recipe = load_recipe("recipes/tiny_omni.yaml", ["model.dense.hidden_size=64", "model.dense.num_hidden_layers=3",
                                                    "model.upcycle.num_intra_experts=3",
                                                    "model.upcycle.moe_intermediate_size=96"])
    dense = plan_model(recipe, recipe.stages[0])
    assert dense.kind == "dense_llm" and dense.config.num_routed_experts == 0
    assert (dense.config.hidden_size, dense.config.num_hidden_layers) == (64, 3)
    moe = plan_model(recipe, recipe.stages[1])
    assert moe.kind == "upcycle" and (moe.config.hidden_size, moe.config.num_hidden_layers) == (64, 3)
    assert moe.config.num_intra_experts == 3 and moe.config.moe_intermediate_size == 96
    assert moe.upcycle["expert_init"] == "copy" and moe.upcycle["seed"] == recipe.run.seed


def _stage_eval():
    from omni_moe.training.stage_eval import evaluate_stage

    return evaluate_stage


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    from omni_moe.data.synth import generate
    from tests.tiny import save_tiny_omni_folder

    root = tmp_path_factory.mktemp("eval")
    generate(root / "data", seed=0, splits={"val": 6, "test": 9})
    return root / "data", save_tiny_omni_folder(root / "model", seed=0)


def test_eval_section_reaches_the_stage_eval(eval_data, tmp_path):
    from omni.loading import load_model_and_processor

    data, folder = eval_data
    evaluate_stage = _stage_eval()
    model, processor = load_model_and_processor(folder)
    batch_sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)

    def run(*overrides: str, final: bool = False):
        batch_sizes.clear()
        recipe = load_recipe(RECIPE, [*ONE_PROCESS, f"run.output_dir={tmp_path}", *overrides])
        return evaluate_stage(recipe, "s", model, processor, tmp_path, final=final)

    assert run() is None and not (tmp_path / "eval.json").exists()  # no eval.data: no eval
    report = run(f"eval.data={data}", "eval.split=test", "eval.limit=5", "eval.final_limit=7",
                 "eval.batch_size=2", "eval.max_new_tokens=1")
    assert report["split"] == "test" and report["num_samples"] == 5
    assert json.loads((tmp_path / "eval.json").read_text())["num_samples"] == 5
    assert max(batch_sizes) == 2  # eval.batch_size: prompts per generate call
    one_token_calls = len(batch_sizes)
    assert run(f"eval.data={data}", "eval.split=test", "eval.limit=5", "eval.final_limit=7", "eval.batch_size=2",
               "eval.max_new_tokens=1", final=True)["num_samples"] == 7  # the last stage: eval.final_limit
    assert run(f"eval.data={data}", "eval.limit=5", "eval.batch_size=5")["split"] == "val"
    assert max(batch_sizes) == 5
    # eval.max_new_tokens: generation runs one forward per new token (a random model rarely stops early)
    run(f"eval.data={data}", "eval.split=test", "eval.limit=5", "eval.batch_size=2", "eval.max_new_tokens=4")
    assert len(batch_sizes) > one_token_calls


def test_eval_examples_is_the_number_of_chat_answers(eval_data, tmp_path, capsys):
    import shutil

    from omni.run_summary import finish_run
    from omni_moe.training.pipeline import DONE_FILE, MODEL_DIR

    data, folder = eval_data
    shutil.copytree(folder, tmp_path / "last" / MODEL_DIR)
    (tmp_path / "last" / DONE_FILE).write_text("{}")
    for examples in (3, 0):
        recipe = load_recipe(RECIPE, [*ONE_PROCESS, f"run.output_dir={tmp_path}", f"eval.data={data}",
                                      f"eval.examples={examples}",
                                      "stages=[{name: last, preset: alignment, steps: 1}]"])
        finish_run(recipe)
        out = capsys.readouterr().out
        assert out.count("    answer: ") == examples, out[-3000:]
        assert ("chat answers from" in out) == (examples > 0)


def test_data_synth_makes_the_dataset_it_names(tmp_path):
    from omni_moe.training.run_folder import prepare_synth_data

    def make(out, seed: int):
        recipe = load_recipe(RECIPE, [*ONE_PROCESS, f"data.synth={{out: {out}, num: 22, seed: {seed}, eval_num: 11, "
                                                    f"max_samples_per_shard: 1}}"])
        prepare_synth_data(recipe)
        return out

    first, reseeded = make(tmp_path / "a", 0), make(tmp_path / "b", 5)
    # data.synth.out / num / eval_num: the splits there, of those sizes
    assert len((first / "train.jsonl").read_text().splitlines()) == 22
    assert all(len((first / f"{split}.jsonl").read_text().splitlines()) == 11 for split in ("val", "test"))
    # data.synth.max_samples_per_shard=1: one shard per sample (2 per task of the 22)
    index = json.loads((first / "shards" / "train" / "video_shape" / "index.json").read_text())
    assert len(index["shards"]) == 2
    # data.synth.seed: another seed, other samples
    assert (first / "train.jsonl").read_text() != (reseeded / "train.jsonl").read_text()
