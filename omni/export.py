"""`omni export CHECKPOINT OUT`: a training checkpoint -> a Hugging Face folder (optionally pushed to the Hub).

    omni export runs/tiny_omni/mixed_lora/checkpoints/step-000008 out/tiny-omni --merge-lora
    omni export runs/tiny_omni/mixed_lora out/tiny-omni                  # latest valid checkpoint; LoRA as adapter/
    omni export runs/tiny_omni/mixed_lora out/tiny-omni --merge-lora --push-to-hub me/tiny-omni [--private] [--dry-run]

CHECKPOINT: a checkpoint folder (OUTPUT/<stage>/checkpoints/step-N; its manifest is verified), a stage or run
folder (its latest valid checkpoint), or an already exported folder (re-sharded, new model card). Any ZeRO stage
and any EP size: experts are gathered from every EP rank's file by global id (omni/loading.py), without DeepSpeed.

OUT, a folder transformers' Auto classes load with trust_remote_code in a process without this package
(tests/e2e/test_export.py): `model-0000x-of-0000N.safetensors` + `model.safetensors.index.json` (one
`model.safetensors` when it fits in one shard), `config.json` with `auto_map`, the flat
modeling/configuration/processing `.py` files (`register_for_auto_class` makes save_pretrained copy them and the
sibling modules they import relatively), tokenizer + processor files with the chat template,
`generation_config.json`, `README.md` (model card: omni/model_card.py). With LoRA and without `--merge-lora`, the
weights are the base the adapter was trained on and `adapter/` holds the PEFT adapter (adapter_config.json +
adapter_model.safetensors). The folder is written next to OUT under a temporary name and renamed into place, so OUT
is never half-written. The model is built on the meta device and the checkpoint's tensors are assigned to it: one
copy of the weights in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from omni.hub import HubPushError, human_size, push_folder, upload_plan
from omni.loading import (
    ADAPTER_DIR,
    checkpoint_processor,
    is_hf_folder,
    load_checkpoint_model,
    load_model_and_processor,
    locate_run,
    read_checkpoint_spec,
    resolve_checkpoint,
)

INDEX_FILE = "model.safetensors.index.json"


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a training checkpoint as a Hugging Face folder (and push it to the Hub)",
                       description=__doc__.split("\n\n")[0],
                       epilog="The Hub token comes from HF_TOKEN or the stored `hf auth login`; it is never printed "
                              "or written. HF_ENDPOINT selects another Hub endpoint.")
    p.add_argument("checkpoint", help="training checkpoint folder (or a stage / run folder: its latest valid "
                                      "checkpoint; or an exported folder)")
    p.add_argument("out", help="output folder (must not exist or be empty; --overwrite replaces a previous export)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold the LoRA adapter into the weights (default: base weights + a PEFT adapter in adapter/)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors shard, e.g. 2GB or 500MB (default 2GB); bigger models get several "
                        "shards and model.safetensors.index.json")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder, when the checkpoint is no longer inside its `omni train` run folder")
    p.add_argument("--license", default="apache-2.0", help="license in the model card's front matter")
    p.add_argument("--base-model", default=None, metavar="REPO_ID",
                   help="base_model in the model card (default: the Hub model the recipe started from, if any)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own .py files (its auto_map) load the processor; off by default: a folder is read with this package's classes and none of its code runs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it is a previous `omni export` folder (never the source, a folder holding "
                        "it, or any other folder); the new export is written aside and swapped in")
    p.add_argument("--verify", choices=("full", "sizes"), default="full",
                   help="checkpoint manifest check: sha256 of every file (full) or sizes only")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="after exporting, create REPO_ID on the Hub if needed and upload OUT to it")
    p.add_argument("--private", action="store_true", help="create the Hub repo private (with --push-to-hub)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --push-to-hub: list the files and sizes that would be uploaded and contact no server "
                        "(OUT is still written)")
    p.set_defaults(handler=run)


@dataclass
class ExportResult:
    out: Path
    adapter: bool  # adapter/ written beside the base weights
    shards: list[str]  # safetensors files of the model, in order
    source: Path  # the checkpoint (or exported folder) the weights came from
    step: int | None  # checkpoint step (None for an exported folder as the source)


def _parameter_counts(model) -> tuple[int, int]:
    from omni.demo import parameter_layout

    return parameter_layout(model)


def _check_folder(folder: Path) -> list[str]:
    """The model's shard files; raise if the folder misses a piece of the export contract."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        raise RuntimeError(f"{folder / 'config.json'}: no auto_map.AutoModelForCausalLM (register_for_auto_class?)")
    missing = [f"{name}.py" for name in ("configuration_omni", "modeling_omni", "processing_omni")
               if not (folder / f"{name}.py").is_file()]
    missing += [name for name in ("generation_config.json", "tokenizer_config.json", "processor_config.json",
                                  "chat_template.jinja", "README.md") if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"{folder}: export is missing {missing}")
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise RuntimeError(f"{folder / INDEX_FILE}: names shard files that were not written: {absent}")
        return shards
    if not (folder / "model.safetensors").is_file():
        raise RuntimeError(f"{folder}: no model.safetensors and no {INDEX_FILE}")
    return ["model.safetensors"]


def _drop_local_auto_mapping(adapter_config: Path) -> None:
    """PEFT records the base class's module (`omni_moe.modeling.modeling_omni`, our package) for AutoPeftModel; outside this
    project that import fails. The base is loaded with trust_remote_code from the folder instead (model card)."""
    config = json.loads(adapter_config.read_text(encoding="utf-8"))
    config["auto_mapping"] = None
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# what an export of ours holds (besides the model's *.safetensors shards and the modeling .py files)
_EXPORT_FILES = {"config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                 "processor_config.json", "chat_template.jinja", "README.md", INDEX_FILE, ADAPTER_DIR,
                 "special_tokens_map.json", "preprocessor_config.json"}


def _is_our_export(folder: Path) -> bool:
    """A folder `omni export` wrote: the export contract's files, an omni_moe config, our model card, and nothing
    that is not an export file (a run folder, a stage's model/ or any other folder fails this)."""
    try:
        _check_folder(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        card = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, ValueError, RuntimeError, KeyError):
        return False
    foreign = [p.name for p in folder.iterdir() if p.name not in _EXPORT_FILES
               and not p.name.endswith((".safetensors", ".py"))]
    return config.get("model_type") == "omni_moe" and "- omni-moe" in card.split("\n---", 1)[0] and not foreign


def _check_out(source: Path, out: Path, overwrite: bool, inside_allowed: bool = False) -> None:
    """Refuse an OUT that would destroy the source or anything that is not a previous export."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src.is_relative_to(dst):
        raise FileExistsError(f"{out}: is or contains the source {source}; export to another folder")
    if dst.is_relative_to(src) and not inside_allowed:
        raise FileExistsError(f"{out}: is inside the source {source}; export to another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace a previous export)")
        if not _is_our_export(out):
            raise FileExistsError(f"{out}: --overwrite replaces only a previous `omni export` folder, and this is "
                                  "not one (it holds other files or misses the export's); choose another OUT")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished export into place; an old export is moved aside first and deleted only after the new
    one is in place (put back if the swap fails)."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_model(source: str | Path, out: str | Path, *, merge_lora: bool = False, max_shard_size: str | int = "2GB",
                 tokenizer: str | Path | None = None, license: str = "apache-2.0", base_model: str | None = None,
                 repo_id: str | None = None, overwrite: bool = False, verify: str = "full",
                 trust_remote_code: bool = False) -> ExportResult:
    """Write the HF folder for `source` (see the module docstring) at `out`."""
    from peft import PeftModel
    from transformers import GenerationConfig

    from omni.model_card import render_model_card

    source, out = Path(source), Path(out)
    # OUT may lie inside a run or stage folder given as the source, never inside the folder the weights come from
    _check_out(source, out, overwrite, inside_allowed=not is_hf_folder(source))
    if is_hf_folder(source):
        model, processor = load_model_and_processor(source, merge_lora=merge_lora, tokenizer=tokenizer,
                                                    trust_remote_code=trust_remote_code)
        run, step = locate_run(source), None
    else:
        spec = read_checkpoint_spec(resolve_checkpoint(source), verify=verify)
        model = load_checkpoint_model(spec, merge_lora=merge_lora)
        processor = checkpoint_processor(spec, tokenizer)
        run, step, source = locate_run(spec.path), spec.step, spec.path
        _check_out(source, out, overwrite)  # the checkpoint the stage / run folder resolved to

    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        adapter = isinstance(model, PeftModel)
        if adapter:
            for config in model.peft_config.values():
                config.base_model_name_or_path = repo_id  # where the base lives once pushed (None: beside it)
            model.save_pretrained(str(staging / ADAPTER_DIR), safe_serialization=True)
            (staging / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's placeholder card; ours is above
            _drop_local_auto_mapping(staging / ADAPTER_DIR / "adapter_config.json")
            model = model.unload()  # the base weights without the LoRA layers (nothing merged)
        model.save_pretrained(str(staging), max_shard_size=max_shard_size)
        if not (staging / "generation_config.json").is_file():
            GenerationConfig.from_model_config(model.config).save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        card = render_model_card(model.config, run=run, stage=run.stage if run else None, step=step, adapter=adapter,
                                 license=license, base_model=base_model, repo_id=repo_id,
                                 parameters=_parameter_counts(model))
        (staging / "README.md").write_text(card, encoding="utf-8")
        shards = _check_folder(staging)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out=out, adapter=adapter, shards=shards, source=source, step=step)


def run(args: argparse.Namespace, rest=None) -> int:
    if (args.private or args.dry_run) and not args.push_to_hub:
        print("omni export: --private and --dry-run go with --push-to-hub REPO_ID", file=sys.stderr)
        return 2
    try:
        result = export_model(args.checkpoint, args.out, merge_lora=args.merge_lora,
                              max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, license=args.license,
                              base_model=args.base_model, repo_id=args.push_to_hub, overwrite=args.overwrite,
                              verify=args.verify, trust_remote_code=args.trust_remote_code)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as err:
        print(f"omni export: {err}", file=sys.stderr)
        return 1
    plan = upload_plan(result.out)
    what = "base weights + LoRA adapter in adapter/" if result.adapter else "weights"
    print(f"omni export: {result.source} -> {result.out} ({what}; {len(result.shards)} shard(s); {len(plan)} "
          f"files, {human_size(sum(size for _, size in plan))})", flush=True)
    if args.push_to_hub:
        try:
            url = push_folder(result.out, args.push_to_hub, private=args.private, dry_run=args.dry_run)
        except HubPushError as err:
            print(f"omni export: {err}", file=sys.stderr)
            return 1
        if url:
            print(f"omni export: pushed to {url}")
    return 0


__all__ = ["ExportResult", "add_parser", "export_model", "run"]
