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

Layout of OUTPUT (`run.output_dir`): recipe.yaml (the resolved recipe), tokenizer/ (when trained here), and per
stage: checkpoints/, tensorboard/, losses.jsonl (rank 0: step and loss of every step run), model/, DONE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from omni.recipe import Recipe, RecipeError, load_recipe

DONE_FILE = "DONE.json"
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
    except RecipeError as exc:
        print(f"omni train: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dry_run_report(recipe))
        return 0
    launched = "RANK" in os.environ or "WORLD_SIZE" in os.environ
    if not launched and recipe.run.nproc_per_node > 1:
        return relaunch_with_torchrun(args.recipe, args.overrides, recipe.run.nproc_per_node)
    return train(recipe)


def relaunch_with_torchrun(recipe_path: str, overrides: list[str], nproc: int) -> int:
    """`torchrun --standalone --nproc_per_node N -m omni.cli train RECIPE ...`; returns its exit code."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # N ranks sharing the cores: one thread each (GUIDE §6: ~10x faster)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "omni.cli", "train", recipe_path, *overrides]
    print("omni train: launching " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


# ----------------------------------------------------------------------------- building blocks
def manifest_texts(manifest: str | Path) -> list[str]:
    """Every message text of a canonical JSONL manifest (what a BPE tokenizer for the dataset is trained on)."""
    texts = []
    with open(manifest, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                for message in json.loads(line).get("messages", []):
                    content = message.get("content")
                    parts = content if isinstance(content, list) else [content]
                    texts += [p if isinstance(p, str) else p.get("text", "") for p in parts if p]
    return texts


def load_tokenizer(recipe: Recipe, source: str | Path | None):
    """The tokenizer: from `source` (a model folder), a tokenizer folder, or a BPE trained by rank 0 on a manifest
    and saved to OUTPUT/tokenizer (then read by every rank, so all ranks hold the identical one)."""
    # the fast-tokenizer class directly: AutoTokenizer would read an exported folder's config.json (auto_map ->
    # a remote-code prompt) although only the tokenizer files are needed
    from transformers import PreTrainedTokenizerFast as AutoTokenizer

    from training.distributed import get_rank

    spec = recipe.model.tokenizer
    if source is not None or isinstance(spec, str):
        return AutoTokenizer.from_pretrained(str(source if source is not None else spec))
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


def model_config(recipe: Recipe, tokenizer=None):
    """OmniMoeConfig of a `model.config` recipe; vocab size and special ids from the tokenizer unless given."""
    from modeling.configuration_omni import OmniMoeConfig
    from modeling.tokenizer_utils import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN

    fields = dict(recipe.model.config)
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        for key, token in (("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN),
                           ("audio_token_id", AUDIO_TOKEN)):
            fields.setdefault(key, tokenizer.convert_tokens_to_ids(token))
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    else:  # dry run without a tokenizer: only the sizes matter for counting parameters
        spec = recipe.model.tokenizer
        vocab = fields.setdefault("vocab_size", int(spec.get("vocab_size", 512)) if isinstance(spec, dict) else 512)
        for offset, key in enumerate(("image_token_id", "video_token_id", "audio_token_id"), start=1):
            fields.setdefault(key, vocab - offset)
    return OmniMoeConfig(**fields)


def build_model(recipe: Recipe, tokenizer, source: str | Path | None):
    """Stage 1's model (config / upcycle / from), or the previous stage's exported model when `source` is given.
    Every rank builds the same weights (the caller seeds every rank alike)."""
    from modeling.modeling_omni import OmniMoeForCausalLM

    folder = source if source is not None else recipe.model.from_
    if folder is not None:
        return OmniMoeForCausalLM.from_pretrained(str(folder))
    if recipe.model.upcycle is not None:
        from modeling.upcycle import upcycle

        options = dict(recipe.model.upcycle)
        options.setdefault("seed", recipe.run.seed)
        return upcycle(**options)
    return OmniMoeForCausalLM(model_config(recipe, tokenizer))


def build_loader(recipe: Recipe, stage, processor, stage_index: int):
    """This rank's resumable loader over the stage's weighted mix (a fixed-length epoch per rank)."""
    from data.batching import make_batching
    from data.collate import OmniCollator
    from data.loader import ResumableLoader
    from data.mixing import MixedShardDataset
    from training.distributed import get_rank, get_world_size

    entries = stage.data or tuple({"source": name, "weight": 1.0} for name in recipe.data.sources)
    sources = {e["source"]: recipe.data.sources[e["source"]] for e in entries}
    weights = {e["source"]: float(e.get("weight", 1.0)) for e in entries}
    collator = OmniCollator(processor, max_length=recipe.data.max_length)
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
def train(recipe: Recipe) -> int:
    """Every stage in order, in this process (one rank of the job)."""
    from modeling.processing_omni import OmniMoeProcessor
    from training.distributed import get_rank, init_distributed, seed_everything, set_cpu_threads_per_rank, teardown
    from training.loop import train_stage

    set_cpu_threads_per_rank()
    init_distributed(timeout_s=recipe.train.timeout_s)
    output = Path(recipe.run.output_dir)
    if get_rank() == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.yaml").write_text(yaml.safe_dump(recipe.raw, sort_keys=False), encoding="utf-8")
    settings = run_settings(recipe)
    micro_batch_size = int(recipe.data.batching.get("batch_size") or 1)
    source: Path | None = None
    for index, stage in enumerate(recipe.stages):
        stage_dir = output / stage.name
        if (stage_dir / DONE_FILE).is_file():
            source = stage_dir / MODEL_DIR
            if get_rank() == 0:
                print(f"omni train: stage {stage.name} already done ({stage_dir / DONE_FILE}); skipping", flush=True)
            continue
        seed_everything(recipe.run.seed, rank_offset=False)  # identical initial weights on every rank
        tokenizer = load_tokenizer(recipe, source if source is not None else recipe.model.from_)
        model = build_model(recipe, tokenizer, source)
        processor = OmniMoeProcessor.from_config(model.config, tokenizer)
        loader = build_loader(recipe, stage, processor, index)
        seed_everything(recipe.run.seed + index)  # per-rank streams (dropout); a resume restores them instead
        result = train_stage(model, stage, settings, loader, micro_batch_size)
        if not result.finished:
            if get_rank() == 0:
                print(f"omni train: stopped at step {result.state.step} of stage {stage.name} "
                      f"(train.stop_after_steps); re-run the same command to continue", flush=True)
            break
        export_stage_model(result, stage_dir / MODEL_DIR, tokenizer, processor)
        if get_rank() == 0:
            (stage_dir / DONE_FILE).write_text(json.dumps({
                "stage": stage.name, "steps": result.state.step, "model": str(stage_dir / MODEL_DIR),
                "tokens_seen": result.state.tokens_seen, "samples_seen": result.state.samples_seen,
            }, indent=2) + "\n")
            print(f"omni train: stage {stage.name} done -> {stage_dir / MODEL_DIR}", flush=True)
        _barrier()
        source = stage_dir / MODEL_DIR
        del result, model, loader
    teardown()
    return 0  # stopped early on purpose (stop_after_steps) is a success too


# ----------------------------------------------------------------------------- dry run
def dry_run_report(recipe: Recipe) -> str:
    """Resolved config, data plan, parameter/expert layout; the model is built on the meta device (no weights)."""
    import torch

    from modeling.configuration_omni import OmniMoeConfig
    from modeling.modeling_omni import OmniMoeForCausalLM
    from omni.demo import parameter_layout

    lines = [f"# recipe {recipe.path} (overrides applied)", yaml.safe_dump(recipe.raw, sort_keys=False).rstrip(), ""]
    world, batch = recipe.run.nproc_per_node, recipe.data.batching
    lines.append("data plan:")
    for stage in recipe.stages:
        entries = stage.data or tuple({"source": n, "weight": 1.0} for n in recipe.data.sources)
        total = sum(float(e.get("weight", 1.0)) for e in entries)
        per_step = f"{batch.get('batch_size', '?')} x {recipe.train.gradient_accumulation_steps} x {world} ranks"
        lines.append(f"  stage {stage.name}: {stage.steps} steps, {per_step} samples per step ({batch.get('strategy', 'mixed')}"
                     f" batching), trains {list(stage.train)}")
        for e in entries:
            path = Path(recipe.data.sources[e["source"]])
            index = path / "index.json"
            found = (f"{len(json.loads(index.read_text())['shards'])} shards, "
                     f"{json.loads(index.read_text())['num_samples']} samples") if index.is_file() else "NOT BUILT YET"
            lines.append(f"    {e['source']:<12} weight {float(e.get('weight', 1.0)) / total:6.1%}  {path} ({found})")
    model = recipe.model
    if model.from_ is not None:
        config, origin = OmniMoeConfig.from_pretrained(model.from_), f"loaded from {model.from_}"
    elif model.upcycle is not None:
        from modeling.upcycle import dense_llm_fields, encoder_config
        from transformers import AutoConfig

        up = {k: v for k, v in model.upcycle.items()
              if k not in ("dense_path", "vision_path", "audio_path", "expert_init", "noise_std", "seed", "dtype")}
        up.update(dense_llm_fields(AutoConfig.from_pretrained(model.upcycle["dense_path"])))
        for key, kind in (("vision_path", "vision"), ("audio_path", "audio")):
            if model.upcycle.get(key):
                up[f"{kind}_config"] = encoder_config(model.upcycle[key], kind)
        config, origin = OmniMoeConfig(**up), f"upcycled from {model.upcycle['dense_path']}"
    else:
        config, origin = model_config(recipe), "built from model.config (vocab size from the tokenizer spec)"
    with torch.device("meta"):
        meta_model = OmniMoeForCausalLM(config)
    total, active = parameter_layout(meta_model)
    pools = {name: f"{r.start}-{r.stop - 1}" for name, r in config.expert_pools().items() if len(r)}
    ep = recipe.parallel.ep_size
    lines += ["", f"model: {origin}",
              f"parameters: total {total:,}, active per token {active:,}",
              f"experts per MoE layer: {config.num_routed_experts} routed, pools {pools}; "
              f"EP={ep}: {config.num_routed_experts // ep} experts per rank (global ids rank::{ep})",
              f"parallel: {world} processes, EP={ep}, ZeRO-{recipe.parallel.zero_stage}, {recipe.parallel.precision}",
              f"output: {recipe.run.output_dir}"]
    return "\n".join(lines)


__all__ = ["add_parser", "build_loader", "build_model", "dry_run_report", "export_stage_model", "load_tokenizer",
           "manifest_texts", "model_config", "relaunch_with_torchrun", "run", "train"]
