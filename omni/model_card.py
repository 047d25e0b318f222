"""The model card (README.md) of an exported folder: YAML front matter for the Hub, then what the model is.

    text = render_model_card(config, run=locate_run(checkpoint), stage="mixed_lora", step=8, adapter=False)

Front matter: `library_name: transformers`, `pipeline_tag` (from the encoders present), `license`, `base_model`
(when the recipe names a Hub model), `tags`. Body: how to load it, the architecture, the expert layout per
modality (router columns = global expert ids), the stages the run went through (recipe: what each trained, its
data mix and steps; DONE.json: the steps actually run), and an evaluation table for every stage with an eval.json
(written by `omni_moe.training.stage_eval`, the shape `omni eval --json` writes: {"per_modality": {name: {"n", "exact_match",
"token_f1", ...}}, "per_task": {...}, "overall": exact match, "num_samples": n}).
Local paths from the recipe never appear (data sources are shown by name), and secrets are scrubbed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from omni.loading import RunLocation
from omni_moe.training.pipeline import DONE_FILE
from omni_moe.training.stage_eval import EVAL_FILE

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def format_ids(ids) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    ids = sorted(ids)
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


def pipeline_tag(config) -> str:
    vision, audio = config.vision_config is not None, config.audio_config is not None
    if vision and audio:
        return "any-to-any"
    if vision:
        return "image-text-to-text"
    if audio:
        return "audio-text-to-text"
    return "text-generation"


def base_model_of(run: RunLocation | None) -> str | None:
    """A Hub repo id the run started from (model.from or upcycle.dense_path), if the recipe names one: the path
    itself when it is a repo id and not a local folder, else the local folder's config `_name_or_path`."""
    if run is None:
        return None
    model = run.recipe.get("model") or {}
    origin = model.get("from") or (model.get("upcycle") or {}).get("dense_path")
    if not isinstance(origin, str):
        return None
    local = run.resolve(origin)
    if local is None:
        return origin if _REPO_ID.match(origin) else None
    config = local / "config.json"
    name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path", "") if config.is_file() else ""
    return name if isinstance(name, str) and _REPO_ID.match(name) and not Path(name).exists() else None


def front_matter(config, *, license: str, base_model: str | None, adapter: bool) -> dict[str, Any]:
    tags = ["omni-moe", "mixture-of-experts", "moe", "multimodal", "custom_code"]
    tags += [m for m in config.modalities if m != "text"]
    if adapter:
        tags += ["peft", "lora"]
    matter: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": pipeline_tag(config), "license": license}
    if base_model:
        matter["base_model"] = base_model
    matter["tags"] = tags
    return matter


# ----------------------------------------------------------------------------------------------- sections
def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _usage(repo: str, adapter: bool) -> list[str]:
    lines = ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoProcessor", ""]
    lines += [f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
              f'processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)']
    if adapter:
        lines += ["", "# the fine-tuned model = these base weights + the LoRA adapter in adapter/",
                  "from peft import PeftModel", f'model = PeftModel.from_pretrained(model, "{repo}", subfolder="adapter")',
                  "model = model.merge_and_unload()  # optional: fold the adapter into the weights"]
    lines += ["", ('conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": '
                   '"Describe the image."}]}]'),
              "inputs = processor([conversation], images=[image], add_generation_prompt=True, return_labels=False)",
              "output = model.generate(**inputs, max_new_tokens=32)", "```", ""]
    return lines


def _architecture(config, parameters: tuple[int, int] | None) -> list[str]:
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    rows = [["decoder", (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                         f"{config.num_attention_heads} attention heads ({config.num_key_value_heads} KV), "
                         f"vocabulary {config.vocab_size}, Omni 3D RoPE")],
            ["MoE layers", f"{format_ids(moe_layers)} ({len(moe_layers)} of {config.num_hidden_layers})"],
            ["experts per MoE layer", (f"{config.num_routed_experts} routed (intermediate "
                                       f"{config.moe_intermediate_size}), {config.num_shared_experts} shared, "
                                       f"{config.num_null_experts} null")],
            ["routing", f"top-{config.num_experts_per_tok}"
                        + (f", dynamic top-p {config.moe_top_p}" if getattr(config, "moe_top_p", None) else "")
                        + ", one fp32 router masked per modality"]]
    if config.vision_config is not None:
        v = config.vision_config
        rows.append(["vision encoder", (f"{v.model_type}, {v.num_hidden_layers} layers, image {v.image_size} px, "
                                        f"patch {v.patch_size}; projector {config.image_projector}")])
    if config.audio_config is not None:
        a = config.audio_config
        rows.append(["audio encoder", (f"Whisper encoder, {a.encoder_layers} layers, {a.num_mel_bins} mel bins; "
                                       f"projector {config.audio_projector}")])
    if parameters is not None:
        rows.append(["parameters", f"{parameters[0]:,} total, {parameters[1]:,} active per token"])
    return ["## Architecture", "", *_table(["part", "setting"], rows), ""]


def _expert_layout(config) -> list[str]:
    pools, allowed = config.expert_pools(), config.allowed_experts()
    inter, null = set(pools.get("inter", ())), set(pools.get("null", ()))
    rows = []
    for modality, row in zip(config.modalities, allowed):
        ids = {g for g, ok in enumerate(row) if ok}
        own = ids & set(pools.get(modality, ()))
        rows.append([modality, format_ids(own), format_ids(ids & inter), format_ids(ids & null)])
    lines = ["## Expert layout", "",
             "Global expert ids (router columns), the same in every MoE layer. A token is routed only among the "
             "experts its modality may use: its own intra-modality pool, the inter-modality pool shared by all "
             "modalities, and null experts (no weights: a slot routed there computes nothing)"
             + (", plus an always-on shared expert." if config.num_shared_experts else "."), "",
             *_table(["modality", "intra-modality experts", "inter-modality experts", "null experts"], rows), ""]
    return lines


def _stages(run: RunLocation, stage: str | None, step: int | None) -> list[str]:
    from omni_moe.training.stage_spec import parse_stages

    specs = parse_stages(run.recipe.get("stages") or [])
    rows = []
    for spec in specs:
        done_file = run.output_dir / spec.name / DONE_FILE
        done = json.loads(done_file.read_text(encoding="utf-8")) if done_file.is_file() else None
        entries = spec.data or tuple({"source": s, "weight": 1.0} for s in (run.recipe.get("data") or {}).get("sources", {}))
        total = sum(float(e.get("weight", 1.0)) for e in entries) or 1.0
        mix = ", ".join(f"{e['source']} {float(e.get('weight', 1.0)) / total:.0%}" for e in entries)
        ran = f"{done['steps']} (done)" if done else ("not finished" if spec.name != stage else f"{step} (this export)")
        lora = f"r={spec.lora.r}, alpha={spec.lora.alpha}, {'/'.join(spec.lora.targets)}" if spec.lora else ""
        rows.append([spec.name, ", ".join(spec.train), spec.steps, ran, mix, lora, spec.optimizer.lr])
    parallel = run.recipe.get("parallel") or {}
    lines = ["## Training", "",
             f"Trained with `omni train` in {len(specs)} stage(s), each starting from the previous stage's weights; "
             f"expert parallelism {parallel.get('ep_size', 1)}, ZeRO-{parallel.get('zero_stage', 1)}, "
             f"{parallel.get('precision', 'fp32')}."
             + (f" This export is stage `{stage}`" + (f", checkpoint step {step}." if step is not None else ".")
                if stage else ""), "",
             *_table(["stage", "trains", "planned steps", "steps run", "data mix", "LoRA", "lr"], rows), ""]
    return lines


def _metric_rows(table: dict) -> tuple[list[str], list[list[Any]]]:
    """{name: float} -> one column; {name: {metric: value}} -> a column per metric."""
    columns: list[str] = []
    for value in table.values():
        for key in value if isinstance(value, dict) else ["exact match"]:
            if key not in columns:
                columns.append(key)
    rows = []
    for name, value in table.items():
        cells = value if isinstance(value, dict) else {"exact match": value}
        rows.append([name] + [_number(cells.get(c, "")) for c in columns])
    return columns, rows


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _evaluation(run: RunLocation) -> list[str]:
    lines: list[str] = []
    for name in run.stage_names:
        path = run.output_dir / name / EVAL_FILE
        if not path.is_file():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        lines += [f"### Stage `{name}`", "",
                  f"Overall exact match {_number(result.get('overall'))} on {result.get('num_samples')} samples.", ""]
        for key, label in (("per_modality", "modality"), ("per_task", "task")):
            if result.get(key):
                columns, rows = _metric_rows(result[key])
                lines += [*_table([label, *columns], rows), ""]
    return ["## Evaluation", "", *lines] if lines else []


def render_model_card(config, *, run: RunLocation | None = None, stage: str | None = None, step: int | None = None,
                      adapter: bool = False, license: str = "apache-2.0", base_model: str | None = None,
                      repo_id: str | None = None, parameters: tuple[int, int] | None = None) -> str:
    """README.md text for an exported folder (see the module docstring)."""
    from omni_moe.training.secret_scrub import scrub_secrets

    base_model = base_model or base_model_of(run)
    matter = front_matter(config, license=license, base_model=base_model, adapter=adapter)
    title = repo_id or (f"{run.output_dir.name} / {stage}" if run and stage else "omni-moe model")
    modalities = ", ".join(config.modalities)
    lines = ["---", yaml.safe_dump(matter, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"An omnimodal sparse mixture-of-experts causal LM ({modalities} in, text out): modality encoders feed "
             "projectors into a decoder whose feed-forward layers are modality-aware MoE layers. The model code "
             "ships in this folder (`trust_remote_code=True`)."
             + (" The LoRA adapter of the last stage is in `adapter/` (PEFT format), next to the base weights it "
                "was trained on." if adapter else ""), ""]
    lines += _usage(repo_id or "PATH_OR_REPO_ID", adapter)
    lines += _architecture(config, parameters)
    lines += _expert_layout(config)
    if run is not None:
        lines += _stages(run, stage, step)
        lines += _evaluation(run)
    return scrub_secrets("\n".join(lines).rstrip() + "\n")


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card (between the leading `---` lines)."""
    if not text.startswith("---\n"):
        raise ValueError("model card: no YAML front matter (must start with '---')")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


__all__ = ["base_model_of", "format_ids", "front_matter", "parse_front_matter", "pipeline_tag", "render_model_card"]
