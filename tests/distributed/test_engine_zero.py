"""The DeepSpeed engine with expert parallelism on real processes (gloo on loopback, real DeepSpeed 0.19.8).

Loss normalisation (why EP=2 on 2 processes and EP=1 on 1 process give the same curve): every step uses the same
global batch of 4 sequences, cut into micro-batches of 2. The model's loss is a per-micro-batch mean (cross-entropy
over its labelled tokens + the router aux/z losses, which are nonlinear in the batch: one forward over 4 sequences
would NOT equal the mean of two forwards over 2). So both layouts run micro-batches of 2: the EP=1 process runs the
two micro-batches as gradient accumulation (GAS=2, DeepSpeed divides by 2), the EP=2 ranks run one each (GAS=1,
DeepSpeed averages over the 2 data-parallel ranks). Both optimise the mean of the two micro-batch losses, and the
reported step loss is that mean. Every sequence has the same number of labelled tokens. The EP=4 test does the
same with micro-batches of 1 (4 processes with GAS=1 vs one process with GAS=4).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN, STEPS = 4, 2, 16, 10
PG_TIMEOUT_S = 30.0
TARGET = "tests.distributed.test_engine_zero"


# ----------------------------------------------------------------------------- worker side
EP4_EXPERTS = {"num_intra_experts": 2, "num_inter_experts": 4}  # 12 routed experts: divisible by 4
EP4_STEPS = 4


def _model(seed: int = 0, **config_overrides):
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from tests.tiny import tiny_config

    torch.manual_seed(seed)
    return OmniMoeForCausalLM(tiny_config(media=False, **config_overrides))


def _global_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    # learnable sequences (arithmetic progressions), so the loss curve really moves in 10 steps
    start = torch.randint(0, 88, (GLOBAL_BATCH, 1), generator=gen)
    stride = torch.randint(1, 3, (GLOBAL_BATCH, 1), generator=gen)
    input_ids = (start + stride * torch.arange(SEQ_LEN)) % 88 + 2
    # one modality per sequence, so several expert pools see traffic
    modality_ids = torch.randint(0, 4, (GLOBAL_BATCH, 1), generator=gen).expand(-1, SEQ_LEN).contiguous()
    return {"input_ids": input_ids, "labels": input_ids.clone(), "modality_ids": modality_ids}


def _micro_batch(step: int, index: int, micro: int = MICRO_BATCH) -> dict[str, torch.Tensor]:
    return {k: v[index * micro:(index + 1) * micro] for k, v in _global_batch(step).items()}


def _config(zero_stage: int, gas: int, precision: str = "fp32", micro: int = MICRO_BATCH) -> dict:
    from omni_moe.training.engine import build_deepspeed_config

    return build_deepspeed_config(
        micro_batch_size=micro, gradient_accumulation_steps=gas, zero_stage=zero_stage, precision=precision,
        gradient_clipping=1.0, lr=2e-3,
    )


def _schedule(steps: int = STEPS):
    from omni_moe.training.lr_schedule import LRSchedule

    return LRSchedule("cosine", warmup_steps=2, total_steps=steps, min_lr_ratio=0.1)


def _full_state(setup) -> dict[str, torch.Tensor]:
    """Dense parameters + gathered full expert tensors (EP=1 layout), fp32 CPU."""
    from omni_moe.training.expert_parallel import gather_full_expert_state, is_expert_key

    module = setup.engine.module
    state = {k: v.detach().float().clone() for k, v in module.state_dict().items() if not is_expert_key(k)}
    state.update({k: v.float() for k, v in gather_full_expert_state(module, setup.layout.ep_group).items()})
    return state


def _train(rank: int, world: int, ep_size: int, zero_stage: int, steps: int = STEPS, precision: str = "fp32",
           checkpointing: bool = False, micro: int = MICRO_BATCH, model_overrides: dict | None = None) -> dict:
    """`steps` optimizer steps on the global batches; each rank runs micro-batches `micro * world + rank`."""
    import torch.distributed as dist

    from tests.distributed.engine_setup import engine_for
    from omni_moe.training.expert_parallel import is_expert_key

    gas = GLOBAL_BATCH // micro // world
    model = _model(**(model_overrides or {}))
    setup = engine_for(model, _config(zero_stage, gas, precision, micro), ep_size, lr_schedule=_schedule(steps),
                       activation_checkpointing=checkpointing, timeout_s=PG_TIMEOUT_S)
    engine = setup.engine
    losses, grad_norms = [], []
    for step in range(steps):
        local = []
        for index in range(gas):
            out = engine(**_micro_batch(step, index * world + rank, micro))
            engine.backward(out.loss)
            engine.step()
            local.append(out.loss.detach().float())
        step_loss = torch.stack(local).mean()
        dist.all_reduce(step_loss)
        losses.append(float(step_loss) / world)
        grad_norms.append(float(engine.get_global_grad_norm() or 0.0))
    shard = {n: p.detach().float().clone() for n, p in model.named_parameters() if is_expert_key(n)}
    moe_partitions = []
    if zero_stage:  # ZeRO 1/2: the process group each optimizer group is partitioned over
        groups = zip(engine.optimizer.optimizer.param_groups, engine.optimizer.real_dp_process_group, strict=True)
        moe_partitions = [dist.get_world_size(group=pg) for g, pg in groups if g.get("moe")]
    return {
        "losses": losses, "grad_norms": grad_norms, "state": _full_state(setup), "shard": shard,
        "ep_rank": setup.layout.ep_rank,
        "has_moe_layers": engine.has_moe_layers, "moe_partitions": moe_partitions,
        "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
    }


BF16_STEPS = 4


def worker_runs(rank: int, world: int, args: dict) -> dict:
    """ZeRO-0/1/2 fp32 runs and a short bf16 ZeRO-2 run at the given EP size (EP=2 recomputes activations in its
    ZeRO-2 run: checkpointing re-issues the all-to-alls in backward)."""
    ep_size = args["ep_size"]
    runs = {
        f"zero{stage}": _train(rank, world, ep_size, stage, checkpointing=ep_size > 1 and stage == 2)
        for stage in (0, 1, 2)
    }
    runs["zero2_bf16"] = _train(rank, world, ep_size, 2, steps=BF16_STEPS, precision="bf16")
    if ep_size == 1:  # the one-process reference of the EP=4 test: micro-batches of 1, GAS=4
        runs["ep4_reference"] = _train(rank, world, 1, 1, steps=EP4_STEPS, micro=1, model_overrides=EP4_EXPERTS)
    return runs


def worker_ep4(rank: int, world: int, args: dict) -> dict:
    run = _train(rank, world, 4, 1, steps=EP4_STEPS, micro=1, model_overrides=EP4_EXPERTS)
    return {"losses": run["losses"], "state": run["state"], "ep_rank": run["ep_rank"],
            "moe_partitions": run["moe_partitions"]}


# ----------------------------------------------------------------------------- shared launches
@pytest.fixture(scope="module")
def reference(spawn):
    """EP=1 on one process (GAS=2)."""
    return spawn(f"{TARGET}:worker_runs", 1, {"ep_size": 1}, timeout_s=240, pg_timeout_s=PG_TIMEOUT_S,
                 init="deepspeed")[0]


@pytest.fixture(scope="module")
def ep2(spawn):
    """EP=2 over 2 processes (GAS=1)."""
    return spawn(f"{TARGET}:worker_runs", 2, {"ep_size": 2}, timeout_s=300, pg_timeout_s=PG_TIMEOUT_S,
                 init="deepspeed")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(((float((a[k] - b[k]).abs().max()), k) for k in a), key=lambda t: t[0])


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_ep2_loss_curve_and_weights_match_ep1(reference, ep2, stage):
    """Same global batches and seed: EP=2 (2 processes) and EP=1 (1 process) give the same 10-step loss curve
    (<= 1e-5, fp32), the same clipped global grad norms and the same final weights, through DeepSpeed's engine at
    ZeRO-0/1/2 (the ZeRO-2 EP run also recomputes activations in backward). See the module docstring for the loss
    normalisation."""
    ref = reference[f"zero{stage}"]
    for rank, run in enumerate(r[f"zero{stage}"] for r in ep2):
        assert run["has_moe_layers"] and run["global_steps"] == STEPS and run["skipped_steps"] == 0
        assert len(run["losses"]) == STEPS and all(math.isfinite(x) for x in run["losses"])
        diffs = [abs(a - b) for a, b in zip(run["losses"], ref["losses"], strict=True)]
        assert max(diffs) <= 1e-5, (rank, run["losses"], ref["losses"])
        torch.testing.assert_close(torch.tensor(run["grad_norms"]), torch.tensor(ref["grad_norms"]), atol=1e-5,
                                   rtol=1e-5)
        diff, key = _max_diff(run["state"], ref["state"])
        assert diff <= 1e-5, (rank, key, diff)
    assert ref["losses"][-1] < ref["losses"][0] - 0.2  # it trains: the comparison is not between frozen runs
    assert min(ref["grad_norms"]) > 1.0  # above the clip threshold, so clipping is exercised


def test_ep2_bf16_zero2_tracks_ep1(reference, ep2):
    """bf16 (fp32 master weights and gradient accumulation): same curve up to bf16 rounding."""
    ref = reference["zero2_bf16"]["losses"]
    for run in (r["zero2_bf16"] for r in ep2):
        assert len(run["losses"]) == BF16_STEPS and run["skipped_steps"] == 0
        assert max(abs(a - b) for a, b in zip(run["losses"], ref, strict=True)) <= 2e-3, (run["losses"], ref)


def test_ep4_on_four_processes_matches_one_process(spawn, reference):
    """EP=4 over 4 processes (each rank holds 3 of 12 experts) vs one process with GAS=4, ZeRO-1, 4 steps."""
    ref = reference["ep4_reference"]
    results = spawn(f"{TARGET}:worker_ep4", 4, {}, timeout_s=240, pg_timeout_s=60, init="deepspeed")
    assert sorted(r["ep_rank"] for r in results) == [0, 1, 2, 3]
    for rank, run in enumerate(results):
        assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"], strict=True)) <= 1e-5, (rank, run["losses"])
        diff, key = _max_diff(run["state"], ref["state"])
        assert diff <= 1e-5, (rank, key, diff)
        assert set(run["moe_partitions"]) == {1}


def test_expert_shards_differ_per_rank_and_match_reference_slices(reference, ep2):
    """Expert gradients are reduced over the expert-data-parallel group (size 1 at world 2, EP 2): each rank keeps
    its own shard, which equals rows ep_rank::2 of the EP=1 run's experts; ZeRO-1/2 partition each MoE optimizer
    group over that group (size 1 here)."""
    ref_state = reference["zero2"]["state"]
    shards = [r["zero2"]["shard"] for r in ep2]
    assert [r["zero2"]["ep_rank"] for r in ep2] == [0, 1]
    for name in shards[0]:
        assert not torch.allclose(shards[0][name], shards[1][name])
        for rank in range(2):
            torch.testing.assert_close(shards[rank][name], ref_state[name][rank::2], atol=1e-5, rtol=0)
    assert all(r["zero2"]["moe_partitions"] and set(r["zero2"]["moe_partitions"]) == {1} for r in ep2)
    assert set(reference["zero2"]["moe_partitions"]) == {1}


# ----------------------------------------------------------------------------- world 2, EP 1; NaN guard; frozen
def worker_dp2_ep1(rank: int, world: int, args: dict) -> dict:
    """Data parallel 2, EP 1: expert gradients reduced over the whole world (expert-data-parallel group = world)."""
    result = _train(rank, world, 1, 2, steps=3)
    shard = result.pop("shard")
    return {"shard": shard, "losses": result["losses"], "moe_partitions": result["moe_partitions"]}


def worker_nan_guard(rank: int, world: int, args: dict) -> dict:
    """EP=2, ZeRO-0 fp32, some parameters frozen: NaN loss on rank 1 at step 2, an inf gradient (finite loss) on
    rank 1 at step 3 (constant lr: no schedule)."""
    from tests.distributed.engine_setup import engine_for
    from omni_moe.training.engine import build_deepspeed_config, guarded_backward_step, optimizer_param_groups

    model = _model()
    frozen = [model.model.embed_tokens.weight, model.model.layers[1].mlp.experts.down_proj]
    for param in frozen:
        param.requires_grad_(False)
    frozen_before = [p.detach().clone() for p in frozen]
    config = build_deepspeed_config(micro_batch_size=MICRO_BATCH, zero_stage=0, lr=2e-3, gradient_clipping=1.0)
    engine = engine_for(model, config, 2, timeout_s=PG_TIMEOUT_S).engine
    optimizer_param_ids = {id(p) for _, params in optimizer_param_groups(engine) for p in params}
    stepped, changed = [], []
    for step in range(5):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = engine(**_micro_batch(step, rank)).loss
        hook = None
        if step == 2 and rank == 1:
            loss = loss * float("nan")
        if step == 3 and rank == 1:
            hook = model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        stepped.append(guarded_backward_step(engine, loss))
        if hook is not None:
            hook.remove()
        changed.append(any(not torch.equal(before[n], p) for n, p in model.named_parameters()))
    return {
        "stepped": stepped, "changed": changed, "global_steps": engine.global_steps,
        "frozen_unchanged": all(torch.equal(a, b) for a, b in zip(frozen_before, frozen, strict=True)),
        "frozen_in_optimizer": any(id(p) in optimizer_param_ids for p in frozen),
        "finite_after": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }


def test_world2_ep1_keeps_experts_identical_on_both_ranks(spawn, reference):
    """World 2, EP 1: both ranks hold every expert; expert gradients are averaged over the expert-data-parallel
    group (= the world), so the experts stay identical on both ranks, the loss curve equals the one-process run's,
    and ZeRO-2 partitions the expert optimizer state over both ranks."""
    results = spawn(f"{TARGET}:worker_dp2_ep1", 2, {}, timeout_s=180, pg_timeout_s=PG_TIMEOUT_S, init="deepspeed")
    assert results[0]["shard"].keys() == results[1]["shard"].keys() and len(results[0]["shard"]) == 4
    for name, value in results[0]["shard"].items():
        assert torch.equal(value, results[1]["shard"][name]), name
    for r in results:
        torch.testing.assert_close(
            torch.tensor(r["losses"]), torch.tensor(reference["zero2"]["losses"][:3]), atol=1e-5, rtol=0
        )
        assert set(r["moe_partitions"]) == {2}


def test_nan_on_one_rank_skips_the_step_on_every_rank(spawn):
    """A NaN loss, then an inf gradient, on rank 1 only: both ranks skip those steps and no parameter moves;
    frozen parameters get no optimizer state and never change."""
    results = spawn(f"{TARGET}:worker_nan_guard", 2, {}, timeout_s=180, pg_timeout_s=PG_TIMEOUT_S, init="deepspeed")
    for rank, r in enumerate(results):
        assert r["stepped"] == ["stepped", "stepped", "dropped", "skipped", "stepped"], (rank, r["stepped"])
        assert r["changed"] == [True, True, False, False, True], (rank, r["changed"])  # step 0 trains too
        assert r["global_steps"] == 3 and r["finite_after"]
        assert r["frozen_unchanged"] and not r["frozen_in_optimizer"]


# ----------------------------------------------------------------------------- config (no processes)
def test_build_deepspeed_config_settings():
    from omni_moe.training.engine import build_deepspeed_config

    config = build_deepspeed_config(micro_batch_size=2, gradient_accumulation_steps=4, zero_stage=2, precision="bf16",
                                    gradient_clipping=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                           "overlap_comm": torch.cuda.is_available()}
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["bf16"]["enabled"] and config["data_types"]["grad_accum_dtype"] == "fp32"
    assert "scheduler" not in config  # initialize_engine builds the stage's own (training/lr_schedule.py)
    assert config["gradient_clipping"] == 0.5
    assert build_deepspeed_config(micro_batch_size=1, gradient_clipping=None)["gradient_clipping"] == 0.0  # off
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="gradient_clipping must be a positive number or None"):
            build_deepspeed_config(micro_batch_size=1, gradient_clipping=bad)
    assert "bf16" not in build_deepspeed_config(micro_batch_size=1, zero_stage=0, gradient_clipping=1.0)
    with pytest.raises(ValueError, match="ZeRO-3 is not supported"):
        build_deepspeed_config(micro_batch_size=1, zero_stage=3, gradient_clipping=1.0)


def test_user_config_validation(tmp_path):
    from omni_moe.training.engine import load_deepspeed_config, validate_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {}}}))
    config = validate_deepspeed_config(load_deepspeed_config(path), has_moe=True)
    assert config["optimizer"]["params"]["torch_adam"] is True
    assert config["zero_optimization"]["contiguous_gradients"] is True
    with pytest.raises(ValueError, match="ZeRO-3 is not supported for MoE"):
        validate_deepspeed_config({"zero_optimization": {"stage": 3}}, has_moe=True)
    with pytest.raises(ValueError, match="offload"):
        validate_deepspeed_config(
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, has_moe=True
        )
    # non-finite gradients must skip the step whatever the user's config says
    forced = validate_deepspeed_config({"zero_optimization": {"stage": 2, "compute_grad_norm": False},
                                        "bf16": {"enabled": True, "check_grad_overflow": False}}, has_moe=True)
    assert forced["bf16"]["check_grad_overflow"] is True and forced["zero_optimization"]["compute_grad_norm"] is True
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        load_deepspeed_config(tmp_path / "bad.json")


def test_initialize_engine_refuses_zero3_before_touching_the_model():
    """The config is checked first: no process group, sharding or engine is needed to get the error."""
    from omni_moe.training.deepspeed_moe import ExpertParallelLayout
    from omni_moe.training.engine import initialize_engine

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = ExpertParallelLayout(ep_size=2, ep_rank=0, group_name="ep_size_2", ep_group=None,
                                  expert_data_parallel_group=None, expert_data_parallel_size=1)
    with pytest.raises(ValueError, match="ZeRO-3 is not supported for MoE models"):
        initialize_engine(model, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}, layout)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
