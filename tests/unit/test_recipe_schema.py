"""Every key of the recipe schema does something a test shows, or is rejected by an error naming it.

`schema_keys()` reads the schema from the code (training/recipe.py's sections and value checks, the stage spec's
KEYS and check tables, the presets' options); `HOW_SHOWN` maps every key to
  * Effect("tests/<file>.py::<test>"): a test that shows what the key does (the test function, or a module-level
    function it names -- a helper, a spawned worker -- mentions the key's leaf name: a weak but real link), or
  * Rejected(override): the key is refused; loading the loop recipe with `override` raises RecipeError naming it.
A key added to the schema without a row, or a row left behind by a removed key, fails here by name. The cheap
effects are checked at the bottom of this file; the others live in tests/unit/test_recipe_effects.py and
tests/distributed/test_recipe_train_keys.py.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from omni_moe.training import recipe as recipe_module
from omni_moe.training.recipe import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = "tests/distributed/loop_recipe.yaml"
STAGE_MODULES = ("omni_moe.training.stage_spec", "omni_moe.training.freeze")


def from_stage_modules(name: str):
    """`name` from whichever of STAGE_MODULES defines it."""
    for module_name in STAGE_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"none of {STAGE_MODULES} defines {name}")


# ----------------------------------------------------------------------------- the schema, read from the code
def _string_collections(source) -> list[set[str]]:
    """Every set / tuple / list literal of string constants in `source`'s code (allowed sub-keys, say)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(source)))
    return [{e.value for e in node.elts} for node in ast.walk(tree) if isinstance(node, (ast.Set, ast.Tuple, ast.List))
            and node.elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)]


def allowed_subkeys(anchor: str) -> set[str]:
    """The one literal collection of keys in training/recipe.py holding `anchor` (the sub-keys `_check_values`
    allows for model.tokenizer, data.batching, data.synth: a local set now, a module constant just as well)."""
    found = [s for s in _string_collections(recipe_module) if anchor in s]
    assert len(found) == 1, f"expected one collection of allowed keys with {anchor!r} in training/recipe.py: {found}"
    return found[0]


def preset_options() -> dict[str, set[str]]:
    """Each preset's options: the dict literal in preset_fields keyed by the preset names."""
    preset_fields, presets = from_stage_modules("preset_fields"), from_stage_modules("PRESETS")
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(preset_fields)))):
        if isinstance(node, ast.Dict) and {getattr(k, "value", None) for k in node.keys} == set(presets):
            return {k.value: {e.value for e in v.elts} if isinstance(v, ast.Set) else set()
                    for k, v in zip(node.keys, node.values)}
    raise AssertionError(f"no dict of {list(presets)} -> options in preset_fields")


def section_fields() -> dict[str, list[str]]:
    """Recipe section -> its YAML keys (the dataclass fields; `from_` is YAML's `from`)."""
    hints = typing.get_type_hints(Recipe)
    return {f.name: [g.name.rstrip("_") for g in dataclasses.fields(hints[f.name])]
            for f in dataclasses.fields(Recipe) if dataclasses.is_dataclass(hints[f.name])}


def schema_keys() -> set[str]:
    keys = {f"{section}.{name}" for section, names in section_fields().items() for name in names}
    keys |= {f"model.tokenizer.{k}" for k in allowed_subkeys("bpe_from")}
    keys |= {f"data.batching.{k}" for k in allowed_subkeys("strategy")}
    keys |= {f"data.synth.{k}" for k in allowed_subkeys("max_samples_per_shard")}
    keys |= {f"stages.N.{k}" for k in from_stage_modules("StageSpec").KEYS}
    for sub, table in (("optimizer", "OPTIMIZER_CHECKS"), ("lora", "LORA_CHECKS"), ("moe", "MOE_OVERRIDES")):
        keys |= {f"stages.N.{sub}.{k}" for k in from_stage_modules(table)}
    for preset, options in preset_options().items():
        keys |= {f"stages.N.preset[{preset}]"} | {f"stages.N.preset[{preset}].{o}" for o in options}
    return keys | set(recipe_module.REMOVED_KEYS)


# ----------------------------------------------------------------------------- how each key is shown
@dataclass(frozen=True)
class Effect:
    test: str  # tests/<file>.py::<test function>


@dataclass(frozen=True)
class Rejected:
    override: str  # loading the loop recipe with this override must raise RecipeError naming the key


HERE = "tests/unit/test_recipe_schema.py::"
EFFECTS = "tests/unit/test_recipe_effects.py::"
LOOP = "tests/distributed/test_recipe_train_keys.py::"
TRAIN_KEYS_TEST = LOOP + "test_train_section_keys_shape_the_stage_run"
OPTIMIZER_TEST = LOOP + "test_stage_optimizer_keys_reach_the_engine"
LR_SCHEDULE_TEST = LOOP + "test_lr_schedule_keys_shape_train_lr"
BUILD_TEST = EFFECTS + "test_build_stage_follows_run_model_and_data_keys"
LOADER_TEST = EFFECTS + "test_loader_follows_the_data_section_and_the_stage_mix"
EVAL_TEST = EFFECTS + "test_eval_section_reaches_the_stage_eval"
SYNTH_TEST = EFFECTS + "test_data_synth_makes_the_dataset_it_names"
TRAIN_LOOP = "tests/distributed/test_train_loop.py::"
NONFINITE_TEST = ("tests/distributed/test_nonfinite_skips.py::"
                  "test_deepspeed_skipped_steps_count_and_abort_at_zero1_and_zero2")
RESUME_CONFIG_TEST = ("tests/distributed/test_resume_config.py::"
                      "test_resume_with_a_changed_model_config_is_refused_unless_the_recipe_allows_it")

HOW_SHOWN = {
    "run.output_dir": Effect(BUILD_TEST),
    "run.seed": Effect(EFFECTS + "test_run_seed_sets_the_initial_weights"),
    "run.nproc_per_node": Effect(HERE + "test_nproc_per_node_is_checked_against_the_launcher"),
    "model.config": Effect(BUILD_TEST),
    "model.tokenizer": Effect(BUILD_TEST),
    "model.tokenizer.bpe_from": Effect(BUILD_TEST),
    "model.tokenizer.vocab_size": Effect(BUILD_TEST),
    "model.upcycle": Effect(EFFECTS + "test_model_dense_and_upcycle_plan_the_stage_models"),
    "model.from": Effect(EFFECTS + "test_model_from_loads_the_named_folder"),
    "model.dense": Effect(EFFECTS + "test_model_dense_and_upcycle_plan_the_stage_models"),
    "data.sources": Effect(LOADER_TEST),
    "data.batching": Effect(LOADER_TEST),
    "data.batching.strategy": Effect(LOADER_TEST),
    "data.batching.batch_size": Effect(LOADER_TEST),
    "data.batching.max_tokens": Effect(LOADER_TEST),
    "data.batching.lookahead": Effect(LOADER_TEST),
    "data.batching.packing": Effect(LOADER_TEST),
    "data.batching.max_length": Effect(LOADER_TEST),
    "data.batching.max_batch_size": Effect(LOADER_TEST),
    "data.samples_per_epoch": Effect(LOADER_TEST),
    "data.max_length": Effect(LOADER_TEST),
    "data.num_workers": Effect(LOADER_TEST),
    "data.seed": Effect(LOADER_TEST),
    "data.shuffle_buffer": Effect(LOADER_TEST),
    "data.synth": Effect(SYNTH_TEST),
    "data.synth.out": Effect(SYNTH_TEST),
    "data.synth.num": Effect(SYNTH_TEST),
    "data.synth.seed": Effect(SYNTH_TEST),
    "data.synth.eval_num": Effect(SYNTH_TEST),
    "data.synth.max_samples_per_shard": Effect(SYNTH_TEST),
    "data.root": Effect(HERE + "test_data_root_moves_relative_sources_only"),
    "parallel.ep_size": Effect("tests/unit/test_dry_run.py::test_dry_run_names_a_bad_expert_parallel_size"),
    "parallel.zero_stage": Effect(TRAIN_LOOP + "test_zero2_with_different_media_per_rank_matches_zero1"),
    "parallel.precision": Effect("tests/unit/test_recipe.py::test_a_bf16_run_builds_every_stage_model_in_bf16"),
    "train.gradient_accumulation_steps": Effect(TRAIN_KEYS_TEST),
    "train.save_every": Effect(TRAIN_KEYS_TEST),
    "train.keep_last": Effect(TRAIN_KEYS_TEST),
    "train.log_every": Effect(TRAIN_KEYS_TEST),
    "train.activation_checkpointing": Effect(TRAIN_KEYS_TEST),
    "train.stop_after_steps": Effect(TRAIN_LOOP + "test_split_resume_through_the_loop_equals_straight_run"),
    "train.max_nonfinite_in_a_row": Effect(NONFINITE_TEST),
    "train.spike_factor": Effect(TRAIN_KEYS_TEST),
    "train.router_alarm_max_over_mean": Effect(TRAIN_KEYS_TEST),
    "train.timeout_s": Effect(LOOP + "test_timeout_s_is_the_process_group_timeout"),
    "train.tensorboard": Effect(TRAIN_KEYS_TEST),
    "train.resume_allow_config_changes": Effect(RESUME_CONFIG_TEST),
    "train.gradient_clipping": Rejected("train.gradient_clipping=1.0"),
    "eval.data": Effect(EVAL_TEST),
    "eval.split": Effect(EVAL_TEST),
    "eval.limit": Effect(EVAL_TEST),
    "eval.final_limit": Effect(EVAL_TEST),
    "eval.batch_size": Effect(EVAL_TEST),
    "eval.max_new_tokens": Effect(EVAL_TEST),
    "eval.examples": Effect(EFFECTS + "test_eval_examples_is_the_number_of_chat_answers"),
    "stages.N.name": Effect(TRAIN_KEYS_TEST),
    "stages.N.preset": Effect(HERE + "test_preset_options_produce_the_train_lists"),
    "stages.N.data": Effect(LOADER_TEST),
    "stages.N.train": Effect("tests/unit/test_stages.py::test_row_masks_follow_the_expert_parallel_id_map"),
    "stages.N.optimizer": Effect(OPTIMIZER_TEST),
    "stages.N.steps": Effect(TRAIN_LOOP + "test_full_recipe_runs_every_stage_and_exports_loadable_models"),
    "stages.N.epochs": Rejected("stages.0.epochs=1"),
    "stages.N.moe": Effect(HERE + "test_moe_overrides_change_the_model_config"),
    "stages.N.lora": Effect(HERE + "test_lora_keys_reach_the_attached_adapter"),
    "stages.N.optimizer.lr": Effect(OPTIMIZER_TEST),
    "stages.N.optimizer.betas": Effect(OPTIMIZER_TEST),
    "stages.N.optimizer.eps": Effect(OPTIMIZER_TEST),
    "stages.N.optimizer.weight_decay": Effect(OPTIMIZER_TEST),
    "stages.N.optimizer.warmup_steps": Effect(LR_SCHEDULE_TEST),
    "stages.N.optimizer.min_lr_ratio": Effect(LR_SCHEDULE_TEST),
    "stages.N.optimizer.schedule": Effect(LR_SCHEDULE_TEST),
    "stages.N.optimizer.grad_clip": Effect(OPTIMIZER_TEST),
    "stages.N.optimizer.router_lr_scale": Effect(OPTIMIZER_TEST),
    **{f"stages.N.lora.{k}": Effect(HERE + "test_lora_keys_reach_the_attached_adapter")
       for k in ("r", "alpha", "dropout", "targets")},
    **{f"stages.N.moe.{k}": Effect(HERE + "test_moe_overrides_change_the_model_config")
       for k in ("router_aux_loss_coef", "router_z_loss_coef", "aux_free_bias_rate", "num_experts_per_tok",
                 "moe_top_p", "use_inter_pool", "aux_free_bias", "router_balance")},
    **{key: Effect(HERE + "test_preset_options_produce_the_train_lists") for key in (
        "stages.N.preset[dense_pretrain]", "stages.N.preset[alignment]",
        "stages.N.preset[alignment].encoders_pretrained",
        "stages.N.preset[modality_experts]", "stages.N.preset[modality_experts].modalities",
        "stages.N.preset[modality_experts].encoders_pretrained", "stages.N.preset[mixed_lora]",
        "stages.N.preset[mixed_lora].r", "stages.N.preset[mixed_lora].alpha",
        "stages.N.preset[mixed_lora].encoders_pretrained")},
}


def leaf(key: str) -> str:
    """The name a test must mention: `stages.N.preset[alignment].encoders_pretrained` -> encoders_pretrained,
    `stages.N.preset[alignment]` -> alignment, `model.config` -> config."""
    last = key.rsplit(".", 1)[-1]
    return last[last.index("[") + 1:-1] if last.endswith("]") else last


# ----------------------------------------------------------------------------- (a) table == schema
def test_every_schema_key_has_a_row_and_every_row_a_key():
    schema = schema_keys()
    rejected = {k for k, how in HOW_SHOWN.items() if isinstance(how, Rejected)}
    missing = sorted(schema - set(HOW_SHOWN))
    # a Rejected row may outlive the key in the code (that is the point of it: test (c) shows it is refused)
    stale = sorted(set(HOW_SHOWN) - schema - rejected)
    assert not missing, f"schema keys without a row in HOW_SHOWN (add an Effect or a Rejected): {missing}"
    assert not stale, f"rows for keys the schema no longer has (remove them): {stale}"
    assert len(schema) > 80, sorted(schema)  # the enumeration itself found the sections, checks and presets


def test_the_enumeration_reads_the_schema_from_the_code():
    keys = schema_keys()
    assert {"model.from", "data.batching.max_batch_size", "data.synth.eval_num", "model.tokenizer.bpe_from",
            "stages.N.optimizer.grad_clip", "stages.N.lora.targets", "stages.N.moe.router_balance",
            "stages.N.preset[modality_experts].modalities", "train.gradient_clipping"} <= keys
    assert "model.from_" not in keys and "data.batching.bucket_boundaries" not in keys  # not recipe keys
    # the batching set is the one _check_values enforces: a key outside it is refused naming it
    with pytest.raises(RecipeError, match=r"unknown key data\.batching\.bucket_boundaries"):
        load_recipe(RECIPE, ["data.batching.bucket_boundaries=[8]"])


# ----------------------------------------------------------------------------- (b) effects name real tests
def _test_source(spec: str) -> str:
    """The source of the named test function plus the module-level functions and constants it names (helpers,
    spawned workers, value tables)."""
    path, _, name = spec.partition("::")
    file = REPO / path
    assert file.is_file(), f"{spec}: {path} does not exist"
    text = file.read_text(encoding="utf-8")
    lines = text.splitlines()
    definitions = {}  # module-level functions (with their decorators: parametrize tables) and constants
    for node in ast.parse(text).body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        source = "\n".join(lines[start - 1:node.end_lineno])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            definitions[node.name] = source
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    definitions[target.id] = source
    assert name.startswith("test_") and name in definitions, f"{spec}: no test function {name} in {path}"
    own = definitions[name]
    named = [src for other, src in definitions.items() if other != name and re.search(rf"\b{other}\b", own)]
    return "\n".join([own, *named])


EFFECT_ROWS = sorted(k for k, how in HOW_SHOWN.items() if isinstance(how, Effect))


@pytest.mark.parametrize("key", EFFECT_ROWS)
def test_effect_names_an_existing_test_that_mentions_the_key(key):
    source = _test_source(HOW_SHOWN[key].test)
    assert re.search(rf"\b{re.escape(leaf(key))}\b", source), \
        f"{key}: {HOW_SHOWN[key].test} (and the functions it names) never mention {leaf(key)!r}"


# ----------------------------------------------------------------------------- (c) rejected keys
REJECTED_ROWS = sorted(k for k, how in HOW_SHOWN.items() if isinstance(how, Rejected))


@pytest.mark.parametrize("key", REJECTED_ROWS)
def test_rejected_key_is_refused_naming_it(key):
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPE, [HOW_SHOWN[key].override])
    assert re.search(rf"\b{re.escape(leaf(key))}\b", str(info.value)), str(info.value)


def test_removed_keys_say_what_replaced_them():
    with pytest.raises(RecipeError, match=r"train\.gradient_clipping was removed.*optimizer\.grad_clip"):
        load_recipe(RECIPE, ["train.gradient_clipping=0.5"])


def containers() -> list[str]:
    """Every mapping of the schema that holds keys (run, data.batching, stages.0.moe, ...), from schema_keys()."""
    parents = {key.rsplit(".", 1)[0] for key in schema_keys() if "." in key and "[" not in key}
    return sorted(p.replace("stages.N", "stages.0") for p in parents) + ["stages.0.preset"]


@pytest.mark.parametrize("where", containers())
def test_an_unknown_key_anywhere_is_refused_naming_it(where):
    with pytest.raises(RecipeError, match=r"\bnot_a_key\b"):
        load_recipe(RECIPE, [f"{where}.not_a_key=1"])


def test_a_misspelt_stage_data_entry_key_is_refused():
    with pytest.raises(RecipeError, match="wieght"):
        load_recipe(RECIPE, ["stages.0.data.0.wieght=2.0"])


# ----------------------------------------------------------------------------- (d) cheap effects
def test_data_root_moves_relative_sources_only(tmp_path):
    absolute = str(tmp_path / "elsewhere")
    recipe = load_recipe(RECIPE, [f"data.root={tmp_path}", f"data.sources={{rel: shards/a, abs: {absolute}, "
                                                           f"both: [shards/b, {absolute}]}}",
                                  "stages.0.data=[{source: rel}]", "stages.1.data=[{source: rel}]",
                                  "stages.2.data=[{source: rel}]"])
    assert recipe.data.sources == {"rel": str(tmp_path / "shards/a"), "abs": absolute,
                                   "both": [str(tmp_path / "shards/b"), absolute]}
    assert load_recipe(RECIPE).data.sources == {"synth": "runs/synth/shards/train"}  # no root: as written


def test_nproc_per_node_is_checked_against_the_launcher():
    from omni_moe.training.build import check_local_world_size

    recipe = load_recipe(RECIPE, ["run.nproc_per_node=4"])
    check_local_world_size(recipe, {"LOCAL_WORLD_SIZE": "4"})
    check_local_world_size(recipe, {})  # not launched by torchrun: nothing to compare
    with pytest.raises(RecipeError, match=r"run\.nproc_per_node is 4 but the launcher started 2"):
        check_local_world_size(recipe, {"LOCAL_WORLD_SIZE": "2"})


@pytest.mark.parametrize("override, message", [
    ("model.config.hiden_size=64", r"unknown key model\.config\.hiden_size \(did you mean hidden_size\?\)"),
    ("model.config.num_experts_per_token=2", r"unknown key model\.config\.num_experts_per_token \(did you mean "
                                             r"num_experts_per_tok\?\)"),
])
def test_model_config_fields_are_checked_by_name(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, [override])


def test_model_upcycle_and_dense_fields_are_checked_by_name():
    with pytest.raises(RecipeError, match=r"unknown key model\.upcycle\.expert_inti \(did you mean expert_init\?\)"):
        load_recipe("recipes/tiny_omni.yaml", ["model.upcycle.expert_inti=slice"])
    # an LLM field belongs to the dense checkpoint, not to upcycle: refused, not silently dropped
    with pytest.raises(RecipeError, match=r"unknown key model\.upcycle\.hidden_size"):
        load_recipe("recipes/tiny_omni.yaml", ["model.upcycle.hidden_size=32"])
    with pytest.raises(RecipeError, match=r"unknown key model\.dense\.num_intra_experts"):
        load_recipe("recipes/tiny_omni.yaml", ["model.dense.num_intra_experts=2"])
    with pytest.raises(RecipeError, match=r"unknown key model\.dense\.hiden_size \(did you mean hidden_size\?\)"):
        load_recipe("recipes/tiny_omni.yaml", ["model.dense.hiden_size=32"])


# a value different from both tiny_config's and the model's default, valid for it (2 intra + 2 inter + 1 null)
MOE_VALUES = {"router_aux_loss_coef": 0.37, "router_z_loss_coef": 0.0123, "aux_free_bias_rate": 0.0042,
              "num_experts_per_tok": 3, "moe_top_p": 0.5, "use_inter_pool": False, "aux_free_bias": True,
              "router_balance": "pool"}


def test_moe_overrides_change_the_model_config():
    import torch

    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from tests.tiny import tiny_config

    apply_moe_overrides = from_stage_modules("apply_moe_overrides")
    assert set(MOE_VALUES) == set(from_stage_modules("MOE_OVERRIDES"))  # every override key is tried
    for key, value in MOE_VALUES.items():
        literal = str(value).lower() if isinstance(value, bool) else value
        stage = load_recipe(RECIPE, [f"stages.1.moe.{key}={literal}"]).stages[1]
        assert stage.moe == {key: value}, key
        torch.manual_seed(0)
        model = OmniMoeForCausalLM(tiny_config(media=False))
        before = getattr(model.config, key)
        assert before != value, key
        changes = apply_moe_overrides(model, stage.moe)
        assert changes == {key: (before, value)} and getattr(model.config, key) == value, key
    # top-4 of 2 intra + 1 null without the inter pool is impossible: refused naming top_k
    stage = load_recipe(RECIPE, ["stages.1.moe={num_experts_per_tok: 4, use_inter_pool: false}"]).stages[1]
    with pytest.raises(ValueError, match="top_k"):
        apply_moe_overrides(OmniMoeForCausalLM(tiny_config(media=False)), stage.moe)


def test_lora_keys_reach_the_attached_adapter():
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from tests.tiny import tiny_config

    prepare_model_for_stage = from_stage_modules("prepare_model_for_stage")
    recipe = load_recipe(RECIPE, ["stages.2.lora={r: 3, alpha: 5.0, dropout: 0.25, targets: [attention, "
                                  "shared_experts]}"])
    stage = recipe.stages[2]
    model = prepare_model_for_stage(OmniMoeForCausalLM(tiny_config(media=False)), stage)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (3, 5.0, 0.25)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert adapted and all(("self_attn" in n) or ("shared_expert" in n) for n in adapted), sorted(adapted)[:5]
    assert any("shared_expert" in n for n in adapted) and any("self_attn" in n for n in adapted)
    # the preset's r/alpha are the defaults the stage's own lora section overrides key by key
    assert load_recipe(RECIPE).stages[2].lora.r == 4 and stage.lora.r == 3


@pytest.mark.parametrize("preset, train, lora", [
    ("dense_pretrain", ["all"], None),
    ("alignment", ["image_projector", "audio_projector"], None),
    ("{name: alignment, encoders_pretrained: false}", ["image_projector", "audio_projector", "vision_encoder",
                                                       "audio_encoder"], None),
    ("modality_experts", ["intra_experts", "routers"], None),
    ("{name: modality_experts, modalities: [image, audio]}", ["intra_experts:image", "intra_experts:audio",
                                                              "routers"], None),
    ("{name: modality_experts, encoders_pretrained: false}", ["intra_experts", "routers", "vision_encoder",
                                                              "audio_encoder", "image_projector", "audio_projector"],
     None),
    ("mixed_lora", ["lora", "routers", "image_projector", "audio_projector"], (8, 16.0)),
    ("{name: mixed_lora, r: 2, alpha: 3.0, encoders_pretrained: false}",
     ["lora", "routers", "image_projector", "audio_projector", "vision_encoder", "audio_encoder"], (2, 3.0)),
])
def test_preset_options_produce_the_train_lists(preset, train, lora):
    spec = from_stage_modules("StageSpec").from_dict({"name": "s", "preset": __import__("yaml").safe_load(preset),
                                                      "steps": 1})
    assert list(spec.train) == train
    assert (None if spec.lora is None else (spec.lora.r, spec.lora.alpha)) == lora
    with pytest.raises(RecipeError, match=r"unknown option\(s\) \['modalities'\]"):
        load_recipe(RECIPE, ["stages.0.preset={name: alignment, modalities: [image]}"])
