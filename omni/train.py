"""`omni train RECIPE [key=value ...] [--dry-run]`: run a training recipe, stage after stage, resumable.

    omni train recipes/tiny_omni.yaml                          # every stage; re-run the same command to resume
    omni train recipes/tiny_omni.yaml train.save_every=2 stages.0.steps=10
    omni train recipes/tiny_omni.yaml --dry-run                # config, data plan, parameter/expert layout

Outside a distributed launch (no RANK / WORLD_SIZE) with `run.nproc_per_node > 1`, the command re-launches itself
through `torchrun --standalone` (the same path multi-node launches take, see launch/torchrun.sh), one thread per
rank on CPU. In each rank, per stage:

    model      stage 1: built from `model.config` (or upcycled, or loaded `from` a folder);
               later stages: loaded from the previous stage's exported folder
    data       the stage's weighted mix of `data.sources` (fixed-length epochs: every rank runs the same steps)
    train      `training.loop.train_stage` (resumes from the stage's latest valid checkpoint by itself)
    export     experts gathered from every EP rank, LoRA merged -> OUTPUT/<stage>/model (a HF folder), then
               OUTPUT/<stage>/DONE.json marks the stage complete; a re-run skips it

Layout of OUTPUT (`run.output_dir`): .omni-run.lock (held by the run using it: training/run_lock.py; a second run on
the folder exits at once naming the holder), recipe.yaml (the resolved recipe), tokenizer/ (when trained here), and per
stage: checkpoints/, tensorboard/, losses.jsonl (rank 0: step and loss of every step run), model/, DONE.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from omni.dry_run import dry_run_report
from omni.recipe import Recipe, RecipeError, load_recipe
from omni.recipe_paths import check_recipe_paths
from training.run_lock import RUN_ID_ENV, RunLock, RunLockHeld, held_by_run

DONE_FILE = "DONE.json"
READY_FILE = "READY.json"  # a finished synthetic dataset
MODEL_DIR = "model"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a recipe (YAML) stage after stage; re-run the command to resume",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML file (its first line shows the command that runs it)")
    # REMAINDER: overrides may come before or after --dry-run (run() picks the flag out of them)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="dotted overrides, values as YAML scalars: train.save_every=2 stages.0.steps=10")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the data plan and the parameter/expert layout; load no weights")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, rest=None) -> int:
    if "--dry-run" in args.overrides:
        args.dry_run = True
        args.overrides = [o for o in args.overrides if o != "--dry-run"]
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_recipe_paths(recipe, plan_only=args.dry_run)  # the dry run reads the model configs alone
    except RecipeError as exc:
        print(f"omni train: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            print(dry_run_report(recipe))
        except (RecipeError, ValueError, FileNotFoundError) as exc:  # e.g. an EP size the world cannot hold
            print(f"omni train --dry-run: {exc}", file=sys.stderr)
            return 2
        return 0
    launched = "RANK" in os.environ or "WORLD_SIZE" in os.environ
    if launched:  # a rank of a torchrun job: rank 0 takes (or inherits) the output folder's lock in train()
        try:
            return train(recipe)
        except RunLockHeld as exc:
            print(f"omni train: {exc}", file=sys.stderr)
            return 3
    try:  # one run per output folder, taken before anything is written (training/run_lock.py)
        lock = RunLock(recipe.run.output_dir).acquire()
    except RunLockHeld as exc:
        print(f"omni train: {exc}", file=sys.stderr)
        return 3
    try:
        prepare_synth_data(recipe)
        if recipe.run.nproc_per_node > 1:
            code = relaunch_with_torchrun(args.recipe, args.overrides, recipe.run.nproc_per_node, run_id=lock.run_id)
        else:
            code = train(recipe, run_lock=lock)
        if code == 0:
            from omni.run_summary import finish_run

            finish_run(recipe)  # eval table, OUTPUT/export, chat answers (once the last stage is done)
    except (RunLockHeld, SynthDataConflict) as exc:
        print(f"omni train: {exc}", file=sys.stderr)
        return 3
    finally:
        lock.release()
    return code


def relaunch_with_torchrun(recipe_path: str, overrides: list[str], nproc: int, run_id: str | None = None) -> int:
    """`torchrun --standalone --nproc_per_node N -m omni.cli train RECIPE ...`; returns its exit code. `run_id`: the
    run whose lock this process holds on the output folder (rank 0 checks it instead of taking the lock)."""
    import torch

    env = dict(os.environ)
    if run_id is not None:
        env[RUN_ID_ENV] = run_id
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # N ranks sharing the cores: one thread each (GUIDE §6: ~10x faster)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "omni.cli", "train", recipe_path, *overrides]
    print("omni train: launching " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


# ----------------------------------------------------------------------------- building blocks
def prepare_synth_data(recipe: Recipe) -> None:
    """`data.synth: {out, num, seed, eval_num, max_samples_per_shard}`: make the synthetic dataset there (one shard set
    per task) unless a previous run finished it with the same command and generator version (its READY.json). Runs
    once, before the ranks start."""
    from data.synth import SYNTH_VERSION

    spec = recipe.data.synth
    if spec is None:
        return
    from omni.cli import build_parser

    argv = ["data", "synth", str(spec["out"]), "--num", str(spec.get("num", 4400)), "--seed",
            str(spec.get("seed", 0)), "--shards-by-task", "--overwrite"]
    if spec.get("eval_num") is not None:
        argv += ["--eval-num", str(spec["eval_num"])]
    if spec.get("max_samples_per_shard") is not None:
        argv += ["--max-samples-per-shard", str(spec["max_samples_per_shard"])]
    ready = {"command": "omni " + " ".join(argv), "synth_version": SYNTH_VERSION}
    out = Path(spec["out"])
    ready_file = out / READY_FILE
    # another `omni train` making this dataset right now fails at once instead of deleting what it writes (inside
    # this run's own output folder, the run's lock covers it already)
    same_folder = out.resolve() == Path(recipe.run.output_dir).resolve()
    with contextlib.nullcontext() if same_folder else RunLock(out):
        if ready_file.is_file():
            try:
                saved = json.loads(ready_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                saved = {}
            if saved == ready:
                return
            # a finished dataset is never regenerated in place: another run may be training on it right now
            raise SynthDataConflict(
                f"data.synth.out {out} holds a finished synthetic dataset made by {saved.get('command')!r} "
                f"(generator {saved.get('synth_version')!r}); this recipe asks for {ready['command']!r} (generator "
                f"{SYNTH_VERSION!r}). Delete {out} to remake it, or set data.synth.out to another folder")
        print(f"omni train: making the synthetic dataset: {ready['command']}", flush=True)
        args = build_parser().parse_args(argv)  # --overwrite: replaces a half-made one (no READY.json)
        if args.handler(args) != 0:
            raise RuntimeError(f"{ready['command']} failed")
        ready_file.write_text(json.dumps(ready) + "\n")


class SynthDataConflict(RuntimeError):
    """data.synth.out holds a finished dataset made by another command or generator version."""


def manifest_texts(manifest: str | Path) -> list[str]:
    """Every message of a canonical JSONL manifest as the chat template lays it out between its special tokens,
    "ROLE\nTEXT" (what a BPE tokenizer for the dataset is trained on). Without the role line the BPE never sees
    "assistant" and spends 9 tokens on it in every sample (measured: 36 -> 22 tokens per synthetic sample)."""
    texts = []
    with open(manifest, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                for message in json.loads(line).get("messages", []):
                    content = message.get("content")
                    parts = content if isinstance(content, list) else [content]
                    text = "".join(p if isinstance(p, str) else p.get("text", "") for p in parts if p)
                    texts.append(f"{message.get('role', 'user')}\n{text}")
    return texts


def load_tokenizer(recipe: Recipe, source: str | Path | None):
    """The tokenizer: from `source` (a model folder), a tokenizer folder, or a BPE trained by rank 0 on a manifest
    and saved to OUTPUT/tokenizer (then read by every rank, so all ranks hold the identical one)."""
    # the fast-tokenizer class directly: AutoTokenizer would read an exported folder's config.json (auto_map ->
    # a remote-code prompt) although only the tokenizer files are needed
    from transformers import PreTrainedTokenizerFast as AutoTokenizer

    from modeling.tokenizer_utils import ensure_special_tokens
    from training.distributed import get_rank

    spec = recipe.model.tokenizer
    if source is not None or isinstance(spec, str):
        tokenizer = AutoTokenizer.from_pretrained(str(source if source is not None else spec))
        # a pretrained LLM's tokenizer (e.g. Qwen2.5's) lacks our media placeholders: add them (appended, so every
        # rank gets the same ids; a model folder of an earlier stage has them already and nothing changes)
        ensure_special_tokens(tokenizer)
        return tokenizer
    folder = Path(recipe.run.output_dir) / "tokenizer"
    if get_rank() == 0 and not (folder / "tokenizer_config.json").is_file():
        from data.tokenizer import build_bpe_tokenizer

        manifest = Path(spec["bpe_from"])
        if not manifest.is_file():
            raise FileNotFoundError(f"model.tokenizer.bpe_from: manifest {manifest} not found (make the dataset "
                                    f"first, e.g. `omni data synth {manifest.parent}`)")
        build_bpe_tokenizer(manifest_texts(manifest), vocab_size=int(spec.get("vocab_size", 512)),
                            out_dir=str(folder))
    _barrier()
    return AutoTokenizer.from_pretrained(str(folder))


def placeholder_ids(tokenizer) -> dict[str, int]:
    """The media placeholder token ids of our tokenizers, as OmniMoeConfig fields."""
    from modeling.tokenizer_utils import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in
            (("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN), ("audio_token_id", AUDIO_TOKEN))}


def model_config(recipe: Recipe, tokenizer=None):
    """OmniMoeConfig of a `model.config` recipe; vocab size and special ids from the tokenizer unless given."""
    from modeling.configuration_omni import OmniMoeConfig

    fields = dict(recipe.model.config)
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        for key, value in placeholder_ids(tokenizer).items():
            fields.setdefault(key, value)
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    else:  # dry run without a tokenizer: only the sizes matter for counting parameters
        spec = recipe.model.tokenizer
        vocab = fields.setdefault("vocab_size", int(spec.get("vocab_size", 512)) if isinstance(spec, dict) else 512)
        for offset, key in enumerate(("image_token_id", "video_token_id", "audio_token_id"), start=1):
            fields.setdefault(key, vocab - offset)
    return OmniMoeConfig(**fields)


def build_model(recipe: Recipe, tokenizer, source: str | Path | None, dense_source: str | Path | None = None):
    """Stage 1's model (config / upcycle / from), the previous stage's exported model when `source` is given, or
    the MoE model upcycled from a dense_pretrain stage's export `dense_source`. Every rank builds the same weights
    (the caller seeds every rank alike), in the run's precision: a bf16 run never holds an fp32 copy of the model
    (at real scale, 63 GB per rank), whatever dtype a stage folder was saved in."""
    import torch

    from modeling.modeling_omni import OmniMoeForCausalLM

    dtype = torch.bfloat16 if recipe.parallel.precision == "bf16" else torch.float32
    folder = source if source is not None else recipe.model.from_
    if folder is not None:
        return OmniMoeForCausalLM.from_pretrained(str(folder), dtype=dtype)
    if recipe.model.upcycle is not None:
        from modeling.upcycle import upcycle

        options = dict(recipe.model.upcycle)
        options.setdefault("seed", recipe.run.seed)
        if dense_source is not None:
            options["dense_path"] = str(dense_source)
        for key, value in placeholder_ids(tokenizer).items():
            options.setdefault(key, value)
        # placeholder ids past the checkpoint's embeddings fail in OmniMoeConfig, before any weights are built
        return upcycle(**options, dtype=dtype)
    return OmniMoeForCausalLM._from_config(model_config(recipe, tokenizer), dtype=dtype)


def dense_llm_config(recipe: Recipe, tokenizer):
    """The OmniMoeConfig of stage 0's dense LLM: `model.dense` (Qwen2 fields), no MoE layer, no media tower, q/k/v
    biases as in Qwen2 -- the same decoder our parity tests hold equal to transformers' Qwen2ForCausalLM."""
    from modeling.configuration_omni import OmniMoeConfig

    fields = {"attention_bias": True, **recipe.model.dense, "moe_layers": "none", "modalities": ["text"],
              "num_intra_experts": 0, "num_inter_experts": 0, "num_shared_experts": 0, "num_null_experts": 0,
              "vision_config": None, "audio_config": None, "vocab_size": len(tokenizer),
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    return OmniMoeConfig(**fields)


def export_dense_llm(result, out_dir: Path, tokenizer) -> None:
    """Collective: stage 0's dense LLM as a plain transformers Qwen2ForCausalLM checkpoint (rank 0 writes), the
    input of upcycling -- exactly what a user's pretrained LLM folder would be."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training.distributed import get_rank

    model = result.model
    config = model.config
    if get_rank() == 0:
        qwen2 = Qwen2Config(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
        )
        dense = Qwen2ForCausalLM(qwen2)
        dense.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, strict=True)
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        dense.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    _barrier()


def build_loader(recipe: Recipe, stage, processor, stage_index: int, strip_media: bool = False):
    """This rank's resumable loader over the stage's weighted mix (a fixed-length epoch per rank); `strip_media`:
    the samples' text alone (stage 0's dense LLM)."""
    from data.batching import make_batching
    from data.collate import OmniCollator
    from data.loader import ResumableLoader
    from data.mixing import MixedShardDataset
    from training.distributed import get_rank, get_world_size

    entries = stage.data or tuple({"source": name, "weight": 1.0} for name in recipe.data.sources)
    sources = {e["source"]: recipe.data.sources[e["source"]] for e in entries}
    weights = {e["source"]: float(e.get("weight", 1.0)) for e in entries}
    collator = OmniCollator(processor, max_length=recipe.data.max_length, strip_media=strip_media)
    dataset = MixedShardDataset(
        sources, weights, samples_per_epoch=recipe.data.samples_per_epoch, rank=get_rank(),
        world_size=get_world_size(), seed=recipe.data.seed + stage_index, shuffle_buffer=recipe.data.shuffle_buffer,
        transform=collator.measure,
    )
    # drop_last: a short last batch would be the only odd-shaped step of an epoch
    return ResumableLoader(dataset, batching=make_batching(**recipe.data.batching), collate_fn=collator,
                           num_workers=recipe.data.num_workers, drop_last=True)


def run_settings(recipe: Recipe):
    from training.loop import RunSettings

    t, p = recipe.train, recipe.parallel
    return RunSettings(
        output_dir=recipe.run.output_dir, seed=recipe.run.seed, ep_size=p.ep_size, zero_stage=p.zero_stage,
        precision=p.precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_clipping=t.gradient_clipping, activation_checkpointing=t.activation_checkpointing,
        save_every=t.save_every, keep_last=t.keep_last, log_every=t.log_every, stop_after_steps=t.stop_after_steps,
        max_nonfinite_in_a_row=t.max_nonfinite_in_a_row, spike_factor=t.spike_factor,
        router_alarm_max_over_mean=t.router_alarm_max_over_mean, timeout_s=t.timeout_s, tensorboard=t.tensorboard,
        resume_allow_config_changes=tuple(t.resume_allow_config_changes),
    )


def export_stage_model(result, out_dir: Path, tokenizer, processor) -> None:
    """Collective: the trained model as a HF folder -- LoRA merged, experts gathered from every EP rank by global
    id into a fresh single-device model (rank 0 writes; staged, then renamed into place)."""
    from modeling.modeling_omni import OmniMoeForCausalLM
    from training.distributed import get_rank
    from training.expert_parallel import gather_full_expert_state, is_expert_key
    from training.lora import merge_lora

    plain = merge_lora(result.model)
    experts = gather_full_expert_state(plain, result.setup.layout.ep_group)
    if get_rank() == 0:
        state = {k: v.detach().cpu() for k, v in plain.state_dict().items() if not is_expert_key(k)}
        state.update(experts)
        fresh = OmniMoeForCausalLM(plain.config)
        fresh.load_state_dict(state, strict=True)
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        fresh.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    _barrier()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- the run
def save_run_recipe(recipe: Recipe, output: Path) -> Path:
    """OUTPUT/recipe.yaml: the resolved recipe (omni/loading.py reads it back), through the secret scrubber the
    checkpoints use (a token in an environment variable never lands on disk)."""
    from training.checkpoint import scrub_secrets

    output.mkdir(parents=True, exist_ok=True)
    path = output / "recipe.yaml"
    path.write_text(yaml.safe_dump(scrub_secrets(recipe.raw), sort_keys=False), encoding="utf-8")
    return path


def _hold_output_folder(output: Path, run_lock: RunLock | None) -> tuple[RunLock | None, str]:
    """Collective: (the lock this rank took, or None; the run id every rank agrees on). Rank 0 uses the lock of
    this process (`run_lock`), or of the `omni train` that launched it (OMNI_RUN_ID), or takes it; when it cannot,
    every rank raises RunLockHeld with rank 0's message (no rank is left waiting in a collective)."""
    from training.distributed import broadcast_text, get_rank

    taken, run_id, error = None, "", ""
    if get_rank() == 0:
        inherited = os.environ.get(RUN_ID_ENV)
        if run_lock is not None and run_lock.held:
            run_id = run_lock.run_id
        elif held_by_run(output, inherited):
            run_id = inherited
        else:
            try:
                taken = RunLock(output, run_id=inherited).acquire()
                run_id = taken.run_id
            except RunLockHeld as exc:
                error = str(exc)
    error, run_id = broadcast_text(error), broadcast_text(run_id)
    if error:
        raise RunLockHeld(error)
    return taken, run_id


def train(recipe: Recipe, run_lock: RunLock | None = None) -> int:
    """Every stage in order, in this process (one rank of the job). `run_lock`: this process's lock on the output
    folder (`run`); without it rank 0 takes the lock (or inherits the launching `omni train`'s)."""
    from training.distributed import init_distributed, set_cpu_threads_per_rank

    set_cpu_threads_per_rank()
    init_distributed(timeout_s=recipe.train.timeout_s)
    output = Path(recipe.run.output_dir)
    taken, run_id = _hold_output_folder(output, run_lock)
    try:
        return _train_stages(recipe, output, run_id)
    finally:
        if taken is not None:
            taken.release()


def _train_stages(recipe: Recipe, output: Path, run_id: str) -> int:
    from modeling.modeling_omni import OmniMoeForCausalLM
    from modeling.processing_omni import OmniMoeProcessor
    from omni.stage_eval import evaluate_stage
    from training.distributed import get_rank, seed_everything, teardown
    from training.loop import train_stage
    from training.stages import unwrap_model

    if get_rank() == 0:
        save_run_recipe(recipe, output)
    settings = dataclasses.replace(run_settings(recipe), run_id=run_id)
    micro_batch_size = int(recipe.data.batching.get("batch_size") or 1)
    source: Path | None = None  # the previous stage's exported MoE model
    dense_source: Path | None = None  # a dense_pretrain stage's exported Qwen2 LLM (the next stage upcycles it)
    for index, stage in enumerate(recipe.stages):
        stage_dir = output / stage.name
        dense = stage.preset == "dense_pretrain"
        if (stage_dir / DONE_FILE).is_file():
            source, dense_source = (None, stage_dir / MODEL_DIR) if dense else (stage_dir / MODEL_DIR, None)
            if get_rank() == 0:
                print(f"omni train: stage {stage.name} already done ({stage_dir / DONE_FILE}); skipping", flush=True)
            continue
        seed_everything(recipe.run.seed, rank_offset=False)  # identical initial weights on every rank
        tokenizer = load_tokenizer(recipe, source or dense_source or recipe.model.from_)
        if dense:
            model = OmniMoeForCausalLM(dense_llm_config(recipe, tokenizer))
        else:
            model = build_model(recipe, tokenizer, source, dense_source)
        processor = OmniMoeProcessor.from_config(model.config, tokenizer)
        loader = build_loader(recipe, stage, processor, index, strip_media=dense)
        seed_everything(recipe.run.seed + index)  # per-rank streams (dropout); a resume restores them instead
        # a dense LLM has no experts to spread: pure data parallelism over every rank
        stage_settings = dataclasses.replace(settings, ep_size=1) if dense else settings
        result = train_stage(model, stage, stage_settings, loader, micro_batch_size)
        if not result.finished:
            if get_rank() == 0:
                print(f"omni train: stopped at step {result.state.step} of stage {stage.name} "
                      f"(train.stop_after_steps); re-run the same command to continue", flush=True)
            break
        if dense:
            export_dense_llm(result, stage_dir / MODEL_DIR, tokenizer)
            eval_model = unwrap_model(result.model)  # the dense model is whole on every rank
        else:
            export_stage_model(result, stage_dir / MODEL_DIR, tokenizer, processor)
            eval_model = OmniMoeForCausalLM.from_pretrained(str(stage_dir / MODEL_DIR))  # what a user gets
        if get_rank() == 0:
            (stage_dir / DONE_FILE).write_text(json.dumps({
                "stage": stage.name, "steps": result.state.step, "model": str(stage_dir / MODEL_DIR),
                "tokens_seen": result.state.tokens_seen, "samples_seen": result.state.samples_seen,
            }, indent=2) + "\n")
            print(f"omni train: stage {stage.name} done -> {stage_dir / MODEL_DIR}", flush=True)
        _barrier()
        # after DONE.json: a failing eval never costs the stage's training
        evaluate_stage(recipe, stage.name, eval_model, processor, stage_dir, text_only=dense,
                       final=index == len(recipe.stages) - 1)
        del eval_model
        source, dense_source = (None, stage_dir / MODEL_DIR) if dense else (stage_dir / MODEL_DIR, None)
        del result, model, loader
    teardown()
    return 0  # stopped early on purpose (stop_after_steps) is a success too


__all__ = ["add_parser", "build_loader", "build_model", "dry_run_report", "export_stage_model", "load_tokenizer",
           "manifest_texts", "model_config", "relaunch_with_torchrun", "run", "save_run_recipe", "train"]
