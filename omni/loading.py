"""Load a model and its processor for inference: from an exported HF folder or from a training checkpoint.

    model, processor = load_model_and_processor("runs/tiny_omni/mixed_lora/model")                     # exported
    model, processor = load_model_and_processor("runs/tiny_omni/mixed_lora/checkpoints/step-000008")   # checkpoint
    model, processor = load_model_and_processor("runs/tiny_omni/mixed_lora")      # the stage's latest valid one
    model, processor = load_model_and_processor("runs/tiny_omni")          # the last stage that has checkpoints
    peft_model, processor = load_model_and_processor(checkpoint, merge_lora=False)    # LoRA kept as an adapter

Used by `omni eval`, `omni chat` and `omni export`. Neither path needs DeepSpeed or a process group.

An exported folder is read with our own classes (the same code the folder ships for `trust_remote_code`), never with
the .py files its `auto_map` names unless the caller passes `trust_remote_code=True` (`--trust-remote-code`); an
`adapter/` subfolder (a PEFT adapter exported beside the base) is applied, merged unless `merge_lora=False`.

A training checkpoint (`training/engine_checkpoint.py`) is read directly from its files, after its manifest verifies:
the model is built on the meta device (accelerate's `init_empty_weights`), so weights are held once; dense tensors
come from model_dense.safetensors, every routed expert from the file of the EP rank that held it, by GLOBAL id
(any saved EP size), and LoRA factors inside the experts (saved per EP rank) are reassembled by global id too. The
checkpoint names its own config (model_config.json) and LoRA config (lora/adapter_config.json). The tokenizer is
the one training used, found through the run folder (OUTPUT/recipe.yaml: the previous stage's exported model, the
recipe's `model.from` / tokenizer folder, or OUTPUT/tokenizer); the processor is rebuilt from config + tokenizer
exactly as `omni train` builds it. Pass `tokenizer=FOLDER` when the checkpoint was moved out of its run folder.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"
_RUN_TOKENIZER_DIR = "tokenizer"  # OUTPUT/tokenizer: the BPE `omni train` trains for a run (training/build.py)
_STAGE_MODEL_DIR = "model"


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def is_training_checkpoint(path: str | Path) -> bool:
    from omni_moe.training.engine_checkpoint import LAYOUT_FILE

    return (Path(path) / LAYOUT_FILE).is_file()


# ----------------------------------------------------------------------------------------- where things are
@dataclass(frozen=True)
class RunLocation:
    """The `omni train` run a checkpoint (or a stage's exported model) belongs to."""

    output_dir: Path  # OUTPUT (holds recipe.yaml)
    stage: str
    recipe: dict  # OUTPUT/recipe.yaml as written by `omni train` (the resolved recipe)

    @property
    def stage_names(self) -> list[str]:
        return _stage_names(self.recipe)

    def resolve(self, path: str) -> Path | None:
        """A path from the recipe: absolute, relative to the current folder, or relative to the folder the run was
        started from (OUTPUT minus the recipe's relative `run.output_dir`). None when none exists."""
        candidates = [Path(path)] if Path(path).is_absolute() else [Path.cwd() / path]
        saved = Path(str((self.recipe.get("run") or {}).get("output_dir", "")))
        here = self.output_dir.resolve()
        if saved.parts and not saved.is_absolute() and here.parts[-len(saved.parts):] == saved.parts:
            candidates.append(here.parents[len(saved.parts) - 1] / path)
        return next((c for c in candidates if c.exists()), None)


def _stage_names(recipe: dict) -> list[str]:
    return [s.get("name") for s in recipe.get("stages") or [] if isinstance(s, dict)]


def _read_recipe(output_dir: Path) -> dict | None:
    """OUTPUT/recipe.yaml (the resolved recipe `omni train` saved), or None."""
    import yaml

    recipe_file = output_dir / RECIPE_FILE
    return (yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}) if recipe_file.is_file() else None


def locate_run(path: str | Path) -> RunLocation | None:
    """The run of OUTPUT/<stage>/checkpoints/step-N or OUTPUT/<stage>/model, when OUTPUT/recipe.yaml exists."""
    path = Path(path).resolve()
    stage_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    recipe = _read_recipe(stage_dir.parent)
    if recipe is None or stage_dir.name not in _stage_names(recipe):
        return None
    return RunLocation(output_dir=stage_dir.parent, stage=stage_dir.name, recipe=recipe)


def resolve_checkpoint(path: str | Path) -> Path:
    """A training checkpoint folder from a checkpoint, a checkpoints/ root, a stage folder (its latest committed
    checkpoint whose files match the manifest's sizes) or a run folder (the same, in the last stage of its recipe
    that has a checkpoint)."""
    from omni_moe.training.checkpoint_store import CheckpointManager

    path = Path(path)
    if is_training_checkpoint(path):
        return path
    if (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    elif any(path.glob("step-*")):
        root = path
    elif (path / RECIPE_FILE).is_file():  # stages run in recipe order: the last one with checkpoints is the latest
        stages = [path / name for name in _stage_names(_read_recipe(path) or {})
                  if CheckpointManager(path / name / "checkpoints").committed_steps()]
        if not stages:
            raise FileNotFoundError(f"{path}: a run folder, but no stage of its {RECIPE_FILE} has a committed "
                                    "checkpoint")
        root = stages[-1] / "checkpoints"
    else:
        raise ValueError(f"{path}: not an exported model folder (config.json + *.safetensors), a training "
                         "checkpoint (training_layout.json), a stage folder (checkpoints/) or a run folder "
                         f"({RECIPE_FILE})")
    # sizes only here: the caller's read_checkpoint_spec hashes the chosen one in full (not every file twice)
    latest = CheckpointManager(root, keep_last=None).latest_valid(verify="sizes")
    if latest is None:
        raise FileNotFoundError(f"{root}: no committed checkpoint whose manifest verifies")
    return latest


# ----------------------------------------------------------------------------------------- checkpoint spec
@dataclass
class CheckpointSpec:
    path: Path
    layout: dict  # training_layout.json
    config: Any  # OmniMoeConfig
    lora_config: Any  # peft.LoraConfig or None

    @property
    def step(self) -> int:
        return int(self.layout["step"])


def read_checkpoint_spec(path: str | Path, verify: str = "full") -> CheckpointSpec:
    """Verify a checkpoint against its manifest (raises CheckpointIntegrityError naming the file) and read what
    model it holds."""
    from omni_moe.modeling.configuration_omni import OmniMoeConfig
    from omni_moe.training.checkpoint_files import read_json
    from omni_moe.training.checkpoint_store import CheckpointManager
    from omni_moe.training.engine_checkpoint import LAYOUT_FILE, LAYOUT_FORMAT

    path = Path(path)
    CheckpointManager(path.parent, keep_last=None).verify(path, mode=verify)
    layout = read_json(path / LAYOUT_FILE)
    if layout.get("format") != LAYOUT_FORMAT:
        raise ValueError(f"{path / LAYOUT_FILE}: format {layout.get('format')!r}, expected {LAYOUT_FORMAT!r}")
    if not layout.get("model_config_file"):
        raise ValueError(f"{path}: the checkpoint does not name its model config (written before checkpoints "
                         "carried model_config.json); export the stage's model/ folder instead")
    config = OmniMoeConfig.from_dict(read_json(path / layout["model_config_file"]))
    lora_config = None
    if layout.get("lora_config_dir"):
        from peft import LoraConfig

        lora_config = LoraConfig.from_pretrained(str(path / layout["lora_config_dir"]))
    return CheckpointSpec(path=path, layout=layout, config=config, lora_config=lora_config)


# ----------------------------------------------------------------------------------------- checkpoint weights
def _place_lora_factor(key: str, full: torch.Tensor, local: torch.Tensor, ids: list[int]) -> None:
    """Copy one EP rank's LoRA factor of a fused-expert ParamWrapper into the all-expert factor `full`, by global
    expert id (`ids`: that rank's experts in local order). PEFT's layout (training/lora.py): lora_A [r*E, in] has
    rows expert-major; lora_B [out, r*E] has columns rank-major (column j*E + e is rank j of expert e)."""
    num_local = len(ids)
    if ".lora_A." in key and local.shape[1:] == full.shape[1:]:
        rank = local.shape[0] // num_local
        full.view(full.shape[0] // rank, rank, -1)[ids] = local.reshape(num_local, rank, -1)
    elif ".lora_B." in key and local.shape[0] == full.shape[0]:
        rank = local.shape[1] // num_local
        full.view(full.shape[0], rank, full.shape[1] // rank)[:, :, ids] = local.reshape(local.shape[0], rank, num_local)
    else:
        raise ValueError(f"{key}: stored per EP rank with shape {tuple(local.shape)} but not a LoRA factor of "
                         f"shape {tuple(full.shape)} over all experts; cannot reassemble it by expert id")


@torch.no_grad()
def checkpoint_state_dict(spec: CheckpointSpec, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full single-device state dict for the keys/shapes/dtypes of `expected` (a meta model's state dict),
    read from the checkpoint's files. Each tensor is allocated once; experts are copied in one at a time."""
    from omni_moe.training.engine_checkpoint import EXPERT_SEPARATOR
    from omni_moe.training.expert_parallel import global_expert_ids, is_expert_key
    from omni_moe.training.weights_files import SafetensorsFile

    path, layout = spec.path, spec.layout
    dense_file = path / layout["dense_file"]
    saved_ep = int(layout["ep_size"])
    expert_files = {int(ep): path / rel for ep, rel in layout.get("expert_files", {}).items()}
    ep_bound = set(layout.get("ep_bound_keys", []))
    num_global = spec.config.num_routed_experts
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        dense = stack.enter_context(SafetensorsFile(dense_file))
        dense_keys = set(dense.keys())
        handles: dict[int, tuple[Any, set[str]]] = {}  # EP rank -> (open file, its tensor names), opened lazily

        def read_expert_file(ep_rank: int, name: str) -> torch.Tensor:
            if ep_rank not in expert_files:
                raise ValueError(f"{path}: layout names no expert file for EP rank {ep_rank} "
                                 f"(has {sorted(expert_files)}; saved at EP={saved_ep})")
            if ep_rank not in handles:
                handle = stack.enter_context(SafetensorsFile(expert_files[ep_rank]))
                handles[ep_rank] = handle, set(handle.keys())
            handle, names = handles[ep_rank]
            if name not in names:
                raise KeyError(f"{expert_files[ep_rank]}: has no tensor {name!r}")
            return handle.get_tensor(name)

        def checked(name: str, tensor: torch.Tensor, shape: torch.Size, source: Path) -> torch.Tensor:
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}")
            return tensor

        # tensors keep the dtype they were saved in (a bf16 run loads as bf16: no upcast copy); the caller casts
        for key, meta in expected.items():
            if key in ep_bound:  # saved whole by every EP rank: reassemble by global id
                parts = [read_expert_file(ep_rank, key) for ep_rank in range(saved_ep)]  # LoRA factors: small
                full = torch.empty(meta.shape, dtype=parts[0].dtype)
                for ep_rank, local in enumerate(parts):
                    _place_lora_factor(key, full, local, global_expert_ids(num_global, ep_rank, saved_ep))
                state[key] = full
            elif is_expert_key(key) and key not in dense_keys:  # fused experts: one tensor per global id
                full = None
                for global_id in range(meta.shape[0]):
                    ep_rank = global_id % saved_ep
                    name = f"{key}{EXPERT_SEPARATOR}{global_id}"
                    expert = checked(name, read_expert_file(ep_rank, name), meta.shape[1:], expert_files[ep_rank])
                    if full is None:
                        full = torch.empty(meta.shape, dtype=expert.dtype)
                    full[global_id] = expert
                state[key] = full
            elif key in dense_keys:
                state[key] = checked(key, dense.get_tensor(key), meta.shape, dense_file)
            else:
                raise KeyError(f"{path}: the checkpoint has no tensor for {key!r} (not in {dense_file.name} nor in "
                               "the expert files): it does not match its model_config.json / LoRA config")
        unexpected = sorted(dense_keys - set(expected))
        if unexpected:
            raise KeyError(f"{dense_file}: tensors the model does not have: {unexpected[:5]}")
    return state


def load_checkpoint_model(path: str | Path | CheckpointSpec, *, merge_lora: bool = True,
                          dtype: torch.dtype | None = None, verify: str = "full"):
    """The checkpoint's model in eval mode on the CPU: an OmniMoeForCausalLM (LoRA merged), or with
    `merge_lora=False` and an adapter present a peft.PeftModel. Built on the meta device, then the checkpoint's
    tensors are assigned (one copy of the weights in memory)."""
    from accelerate import init_empty_weights

    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    spec = path if isinstance(path, CheckpointSpec) else read_checkpoint_spec(path, verify=verify)
    with init_empty_weights():  # parameters on meta; buffers (router masks, RoPE tables) real
        model = OmniMoeForCausalLM(spec.config)
        if spec.lora_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, spec.lora_config)
    state = checkpoint_state_dict(spec, model.state_dict())
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if spec.config.tie_word_embeddings:  # assign=True replaced both tied tensors by separate (equal) ones
        (model.get_base_model() if spec.lora_config is not None else model).tie_weights()
    if spec.lora_config is not None and merge_lora:
        model = model.merge_and_unload()
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------- tokenizer, processor
def tokenizer_source(checkpoint: str | Path) -> Path:
    """The folder whose tokenizer `omni train` used for this checkpoint's stage (see the module docstring)."""
    run = locate_run(checkpoint)
    if run is None:
        raise FileNotFoundError(f"{checkpoint}: not inside an `omni train` run folder (OUTPUT/<stage>/checkpoints/"
                                f"step-N with OUTPUT/{RECIPE_FILE}), so its tokenizer cannot be found; pass the "
                                "tokenizer folder (--tokenizer)")
    index = run.stage_names.index(run.stage)
    tried: list[str] = []
    if index > 0:  # later stages start from the previous stage's exported folder (tokenizer included)
        tried.append(str(run.output_dir / run.stage_names[index - 1] / _STAGE_MODEL_DIR))
    else:
        model = run.recipe.get("model") or {}
        for key in ("from", "tokenizer"):
            if isinstance(model.get(key), str):
                found = run.resolve(model[key])
                tried.append(str(found or model[key]))
        tried.append(str(run.output_dir / _RUN_TOKENIZER_DIR))
    for candidate in tried:
        if (Path(candidate) / "tokenizer_config.json").is_file():
            return Path(candidate)
    raise FileNotFoundError(f"{checkpoint}: no tokenizer found for stage {run.stage!r} (looked in {tried}); pass "
                            "the tokenizer folder (--tokenizer)")


def checkpoint_processor(spec: CheckpointSpec, tokenizer: str | Path | None = None):
    """OmniMoeProcessor for a checkpoint: its config + the run's tokenizer (or `tokenizer`, a folder)."""
    # the fast-tokenizer class directly (as training/build.py): AutoTokenizer would read a model folder's auto_map
    from transformers import PreTrainedTokenizerFast

    from omni_moe.modeling.processing_omni import OmniMoeProcessor

    source = Path(tokenizer) if tokenizer is not None else tokenizer_source(spec.path)
    if not (source / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{source}: no tokenizer_config.json (not a tokenizer folder)")
    return OmniMoeProcessor.from_config(spec.config, PreTrainedTokenizerFast.from_pretrained(str(source)))


# ----------------------------------------------------------------------------------------- an exported folder
# The sub-processors `omni train` builds (modeling/processing_omni.py: _default_image_processor,
# _default_feature_extractor), by the type name they are saved under. The PIL image processors are the ones training
# used, whichever backends are installed.
_IMAGE_PROCESSORS = {"clip": "CLIPImageProcessorPil", "siglip": "SiglipImageProcessorPil"}
_FEATURE_EXTRACTORS = {"whisperfeatureextractor": "WhisperFeatureExtractor"}
_SUB_PROCESSORS = {"image_processor": ("image_processor_type", _IMAGE_PROCESSORS),
                   "feature_extractor": ("feature_extractor_type", _FEATURE_EXTRACTORS)}


def _sub_processor(folder: Path, name: str, saved: dict):
    """One sub-processor from its saved settings, built by a transformers class we name (never the folder's)."""
    import transformers

    type_key, classes = _SUB_PROCESSORS[name]
    saved_type = str(saved.get(type_key, ""))
    class_name = next((cls for prefix, cls in classes.items() if saved_type.lower().startswith(prefix)), None)
    if class_name is None:
        raise ValueError(f"{folder}: processor_config.json's {name} is a {saved_type!r}, not one this package builds "
                         f"({sorted(classes.values())}); pass --trust-remote-code to let the folder's own code load "
                         "it")
    settings = {key: value for key, value in saved.items() if key != "auto_map"}  # auto_map names folder code
    return getattr(transformers, class_name).from_dict(settings)


def folder_processor(folder: str | Path, *, trust_remote_code: bool = False):
    """OmniMoeProcessor for an exported folder.

    By default everything is built from our own classes: the settings and sub-processors from
    processor_config.json, the tokenizer by the fast-tokenizer class directly. `auto_map` entries (which name .py
    files in the folder) are ignored, so no code from the folder runs. `trust_remote_code=True` hands the folder to
    transformers' Auto machinery, which imports the classes its `auto_map` names."""
    from transformers import PreTrainedTokenizerFast

    from omni_moe.modeling.processing_omni import OPTIONAL_SUB_PROCESSORS, OmniMoeProcessor

    folder = Path(folder)
    if trust_remote_code:
        return OmniMoeProcessor.from_pretrained(str(folder), trust_remote_code=True)
    if not (folder / "processor_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no processor_config.json (not an exported model folder)")
    saved, _ = OmniMoeProcessor.get_processor_dict(str(folder))
    sub_processors = {}
    for name in OPTIONAL_SUB_PROCESSORS:
        settings = saved.get(name)
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"{folder / 'processor_config.json'}: {name} is {type(settings).__name__}, expected "
                             "an object or null")
        sub_processors[name] = None if settings is None else _sub_processor(folder, name, settings)
    parameters = inspect.signature(OmniMoeProcessor.__init__).parameters
    settings = {key: saved[key] for key in parameters
                if key in saved and key not in ("self", "kwargs", "tokenizer", *OPTIONAL_SUB_PROCESSORS)}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer.init_kwargs.pop("auto_map", None)  # saved back by save_pretrained otherwise (an export of this folder)
    return OmniMoeProcessor(tokenizer=tokenizer, **sub_processors, **settings)


# ----------------------------------------------------------------------------------------- the entry point
def load_model_and_processor(path: str | Path, *, dtype: torch.dtype | None = None, device: str | None = None,
                             merge_lora: bool = True, tokenizer: str | Path | None = None, verify: str = "full",
                             trust_remote_code: bool = False):
    """(model in eval mode, processor) from an exported folder or a training checkpoint (see the module
    docstring). `merge_lora=False` returns a peft.PeftModel when the source carries an adapter.

    Nothing from the folder is executed unless `trust_remote_code=True` (then only the processor is loaded
    through the folder's `auto_map`; the model is always our own class)."""
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or checkpoint")
    if is_hf_folder(path):
        from omni_moe.training.weights_files import check_safetensors_files

        check_safetensors_files(path)  # transformers' error would name no file
        model = OmniMoeForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
        # the folder's auto_map names its files, not ours: saving this model (an export) writes our own entries
        model.config.auto_map = None
        if (path / ADAPTER_DIR / "adapter_config.json").is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path / ADAPTER_DIR))
            if merge_lora:
                model = model.merge_and_unload()
        processor = folder_processor(Path(tokenizer) if tokenizer is not None else path,
                                     trust_remote_code=trust_remote_code)
    else:
        spec = read_checkpoint_spec(resolve_checkpoint(path), verify=verify)
        model = load_checkpoint_model(spec, merge_lora=merge_lora, dtype=dtype)
        processor = checkpoint_processor(spec, tokenizer)
    if device is not None:
        model.to(device)
    return model.eval(), processor


__all__ = [
    "ADAPTER_DIR", "CheckpointSpec", "RunLocation", "checkpoint_processor", "checkpoint_state_dict",
    "folder_processor", "is_hf_folder",
    "is_training_checkpoint", "load_checkpoint_model", "load_model_and_processor", "locate_run",
    "read_checkpoint_spec", "resolve_checkpoint", "tokenizer_source",
]
