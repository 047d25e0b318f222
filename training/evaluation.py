"""Evaluation of a single-device model on a canonical dataset split: batched greedy answers, scored per modality and
per task (`omni_moe.training.scoring`: exact match, token F1, WER for transcriptions), and where each modality's tokens
are routed. `omni eval` is its CLI; `omni_moe.training.stage_eval` runs it after every training stage.

For every sample the LAST assistant turn is the reference: the messages before it are the prompt (chat template with
the generation prompt, left padding), and the model answers greedily (batched `generate`, prompts sorted by
length). Results are grouped by the sample's modality (`meta.modality`, else the kind of its first media marker,
else text) and by its task (`meta.task`). `routing=True` adds one teacher-forced forward pass over the full
conversations and reports, per token modality, how the routers' probability mass splits between its own
intra-modality pool, the inter-modality pool, other modalities' pools (0 by construction: the router masks them)
and the null experts.

    samples = load_split("runs/synth", "test")      # DIR/<split>.jsonl, media paths relative to DIR
    report = evaluate(model, processor, samples, "runs/synth", batch_size=64, max_new_tokens=16, routing=True)
    print(report.format_table()); report.to_dict(checkpoint=..., split="test")
"""

from __future__ import annotations

from pathlib import Path

import torch

from omni_moe.data.collate import OmniCollator
from omni_moe.data.importers import read_manifest
from omni_moe.data.media import (
    decode_audio,
    decode_image,
    decode_video_container,
    decode_video_frames,
)
from omni_moe.data.media_files import read_media_file
from omni_moe.data.quality import SampleRejected
from omni_moe.data.schema import primary_modality, to_processor_messages, validate_sample
from omni_moe.training.scoring import EvalReport, Prediction, score_predictions

NO_TASK = "unspecified"  # samples of datasets that do not name a task in meta.task


# ----------------------------------------------------------------------------- data
def load_split(data_dir: str | Path, split: str, limit: int | None = None) -> list[dict]:
    """The first `limit` (all if None) validated canonical samples of `DIR/<split>.jsonl`, in file order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such dataset folder (make one with `omni data synth {data_dir}`)")
    manifest = data_dir / f"{split}.jsonl"
    if not manifest.is_file():
        found = sorted(p.stem for p in data_dir.glob("*.jsonl"))
        raise FileNotFoundError(f"{manifest}: no such split file; splits in {data_dir}: {found or 'none'}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    samples = []
    for entry in read_manifest(manifest):
        if limit is not None and len(samples) >= limit:
            break
        try:
            if entry.error is not None:
                raise entry.error
            samples.append(validate_sample(entry.record))
        except SampleRejected as exc:
            raise ValueError(f"{data_dir / entry.where}: bad sample ({exc})") from None
    if not samples:
        raise ValueError(f"{manifest}: no samples to evaluate")
    return samples


def sample_task(sample: dict) -> str:
    return str((sample.get("meta") or {}).get("task") or NO_TASK)


def _media_file(data_dir: Path, relative: str, sample: dict) -> bytes:
    # the shard builder's rule (data/media_files.py): a regular file inside the dataset folder, within the caps
    return read_media_file(data_dir, relative, f"sample {sample['id']!r}: media file")


def load_media(sample: dict, data_dir: str | Path, audio_sampling_rate: int = 16000) -> dict:
    """Decode a canonical sample's media (paths relative to `data_dir`) with `omni_moe.data.media`'s decoders."""
    data_dir = Path(data_dir)
    try:
        images = [decode_image(_media_file(data_dir, rel, sample), rel) for rel in sample["images"]]
        videos, fps = [], list(sample.get("video_fps") or [None] * len(sample["videos"]))
        for i, video in enumerate(sample["videos"]):
            if isinstance(video, str):
                frames, container_fps = decode_video_container(_media_file(data_dir, video, sample), video)
                fps[i] = fps[i] if fps[i] is not None else container_fps
            else:
                frames = decode_video_frames([_media_file(data_dir, rel, sample) for rel in video], video[0])
            videos.append(frames)
        audios = [decode_audio(_media_file(data_dir, rel, sample), rel, target_rate=audio_sampling_rate)[0]
                  for rel in sample["audios"]]
    except SampleRejected as exc:
        raise ValueError(f"sample {sample['id']!r} in {data_dir}: {exc}") from None
    return {"images": images, "videos": videos, "video_fps": fps, "audios": audios}


def _audio_rate(processor) -> int:
    extractor = getattr(processor, "feature_extractor", None)
    return int(extractor.sampling_rate) if extractor is not None else 16000


def _length_order(processor, samples: list[dict], data_dir: Path, prompt_only: bool) -> list[int]:
    """Sample indices sorted by processed length (longest first), so a batch wastes little on padding.

    Token counts come from `OmniCollator.sequence_length` (the processor's own layout and media counts); only
    audio needs decoding for it (its token count depends on the clip's length), images and videos are counted."""
    collator = OmniCollator(processor)
    rate = _audio_rate(processor)
    lengths = []
    for sample in samples:
        audios = [range(len(decode_audio(_media_file(data_dir, rel, sample), rel, target_rate=rate)[0]))
                  for rel in sample["audios"]]  # sequence_length only takes len() of each clip
        messages = sample["messages"][:-1] if prompt_only else sample["messages"]
        lengths.append(collator.sequence_length({**sample, "messages": messages, "audios": audios}))
    return sorted(range(len(samples)), key=lambda i: -lengths[i])  # stable: ties keep file order


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _process(processor, samples: list[dict], data_dir: Path, prompt_only: bool):
    """One processor call for a batch: prompts (left-padded, generation prompt) or full conversations (right)."""
    rate = _audio_rate(processor)
    conversations, images, videos, fps, audios = [], [], [], [], []
    for sample in samples:
        media = load_media(sample, data_dir, rate)
        messages = sample["messages"][:-1] if prompt_only else sample["messages"]
        conversations.append(to_processor_messages(messages))
        images += media["images"]
        videos += media["videos"]
        fps += [f if f is not None else processor.video_fps for f in media["video_fps"]]
        audios += media["audios"]
    return processor(conversations, images=images or None, videos=videos or None, audios=audios or None,
                     video_fps=fps or None, add_generation_prompt=prompt_only, return_labels=False,
                     padding_side="left" if prompt_only else "right")


# ----------------------------------------------------------------------------- model passes
def _stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the tokenizer's eos (ChatML `<|im_end|>`) and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def generate_answers(model, processor, samples: list[dict], data_dir: str | Path, *, batch_size: int = 64,
                     max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to every sample's prompt (messages before the last assistant turn), in sample order."""
    data_dir, tokenizer = Path(data_dir), processor.tokenizer
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    # a generated media placeholder would have no media behind it at the next step (the model raises): an
    # undertrained model can emit one, so it is never a candidate
    placeholders = [i for i in (model.config.image_token_id, model.config.video_token_id,
                                model.config.audio_token_id) if i is not None]
    answers: list[str | None] = [None] * len(samples)
    order = _length_order(processor, samples, data_dir, prompt_only=True)
    for indices in _progress(list(_batches(order, batch_size)), "eval generate"):
        inputs = _process(processor, [samples[i] for i in indices], data_dir, prompt_only=True).to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=stop_ids, pad_token_id=pad_id, suppress_tokens=placeholders)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:].tolist()
        for i, tokens in zip(indices, new_tokens):
            # cut at the first end-of-turn: after it a finished row only holds padding (or, without stop ids
            # honoured by generate, whatever the model babbles on)
            end = next((j for j, t in enumerate(tokens) if t in stop_ids), len(tokens))
            answers[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    return answers


def routing_specialisation(model, processor, samples: list[dict], data_dir: str | Path, *,
                           batch_size: int = 64) -> dict:
    """Teacher-forced forward over the full conversations; per token modality, the share of the routers' masked
    softmax probability (real tokens only) in its intra pool, the inter pool, other pools and null experts.

    Summing `MoeRouterOutput.prob_mass` over layers before normalising equals averaging the per-layer shares:
    every layer sees the same tokens, each contributing probability 1."""
    data_dir, config = Path(data_dir), model.config
    mass, num_layers = None, 0
    order = _length_order(processor, samples, data_dir, prompt_only=False)
    with torch.no_grad():
        for indices in _progress(list(_batches(order, batch_size)), "eval routing"):
            inputs = _process(processor, [samples[i] for i in indices], data_dir, prompt_only=False).to(model.device)
            out = model(**inputs, use_cache=False, logits_to_keep=1)
            if not out.router_outputs:
                raise ValueError("routing report: the model returned no router outputs (no MoE layers?)")
            num_layers = len(out.router_outputs)
            batch_mass = torch.stack([r.prob_mass.double().cpu() for r in out.router_outputs]).sum(0)
            mass = batch_mass if mass is None else mass + batch_mass
    pools = config.expert_pools()
    allowed = config.allowed_experts()
    per_modality = {}
    for m, name in enumerate(config.modalities):
        total = float(mass[m].sum())
        if total <= 0:
            continue  # no token of this modality in the eval set
        own, inter, null = (float(mass[m, list(pools[p])].sum()) for p in (name, "inter", "null"))
        others = [c for other in config.modalities if other != name for c in pools[other]]
        other = float(mass[m, others].sum()) if others else 0.0
        share = {"intra": own / total, "inter": inter / total, "other_pools": other / total, "null": null / total}
        per_modality[name] = {
            "tokens": round(total / num_layers), **share, "intra_plus_inter": share["intra"] + share["inter"],
            # what a router spreading its probability evenly over the allowed columns (null included) would give
            "uniform_intra_share": len(pools[name]) / sum(allowed[m]),
            "intra_pool_size": len(pools[name]), "allowed_columns": sum(allowed[m]),
        }
    return {"num_moe_layers": num_layers, "per_modality": per_modality}


def evaluate(model, processor, samples: list[dict], data_dir: str | Path, *, batch_size: int = 64,
             max_new_tokens: int = 16, routing: bool = False) -> EvalReport:
    """The `omni_moe.training.scoring` report of `model` on canonical `samples` (media relative to `data_dir`); `routing=True`
    adds the routing-specialisation shares. The model is put in eval mode for the call and then restored.

    `model` is a single-device model: one sharded by expert parallelism must be gathered first (its MoE layers
    run collectively, and ranks generating different prompts would stop at different steps)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        answers = generate_answers(model, processor, samples, data_dir, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens)
        routing_report = routing_specialisation(model, processor, samples, data_dir,
                                                batch_size=batch_size) if routing else None
    finally:
        model.train(was_training)
    predictions = [
        Prediction(sample_id=s["id"], task=sample_task(s), modality=primary_modality(s),
                   question=_last_user_text(s), answer=s["messages"][-1]["content"], prediction=a,
                   metric=(s.get("meta") or {}).get("metric"))
        for s, a in zip(samples, answers)
    ]
    report = score_predictions(predictions)
    report.routing = routing_report
    return report


def _last_user_text(sample: dict) -> str:
    users = [m["content"] for m in sample["messages"][:-1] if m["role"] == "user"]
    return users[-1].strip() if users else ""


def _progress(items: list, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch", disable=None, leave=False)  # disable=None: only on a terminal


__all__ = ["evaluate", "generate_answers", "load_media", "load_split", "routing_specialisation", "sample_task"]
