"""Expert parallelism without DeepSpeed: the all-to-all dispatcher and expert sharding on 2 real processes (gloo).

Every worker also computes the single-process reference itself (all ranks' inputs come from fixed seeds, so each
rank can rebuild every rank's batch and run the full expert set with the LocalDispatcher), then reports the
differences; the tests assert on them. A short process-group timeout turns a hang into a failure.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from omni_moe.modeling.moe import GroupedExperts

# modeling/ and training/ pull in transformers (~3 s per process): imported lazily so the spawn-helper workers
# below start fast. `ep` is omni_moe.training.expert_parallel.

EP = 2
NUM_EXPERTS, HIDDEN, FFN = 8, 16, 8
PG_TIMEOUT_S = 15.0  # a hang must fail fast


# ----------------------------------------------------------------------------- helpers (run inside workers)
def _full_experts(dtype: torch.dtype = torch.float32) -> GroupedExperts:
    from omni_moe.modeling.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(NUM_EXPERTS, HIDDEN, FFN)
    experts.implementation = "loop"
    return experts.to(dtype)


def _local_experts(full: GroupedExperts, rank: int) -> GroupedExperts:
    from omni_moe.modeling.moe import GroupedExperts

    local = GroupedExperts(NUM_EXPERTS // EP, HIDDEN, FFN).to(full.gate_up_proj.dtype)
    local.implementation = full.implementation
    with torch.no_grad():
        local.gate_up_proj.copy_(full.gate_up_proj[rank::EP])
        local.down_proj.copy_(full.down_proj[rank::EP])
    return local


def _rank_inputs(rank: int, case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_sorted [N, D], tokens_per_expert [E], output weights [N, D]) of one rank, reproducible on any rank."""
    gen = torch.Generator().manual_seed(100 + rank)
    if case == "random":
        counts = torch.randint(0, 6, (NUM_EXPERTS,), generator=gen)
    elif case == "uneven":
        # rank 0: every row goes to expert 0 (so rank 1's experts get nothing from rank 0);
        # rank 1: sends NOTHING at all (zero rows), so rank 0 receives zero rows for expert 0's peers
        counts = torch.zeros(NUM_EXPERTS, dtype=torch.long)
        if rank == 0:
            counts[0] = 7
    else:
        raise ValueError(case)
    n = int(counts.sum())
    x = torch.randn(n, HIDDEN, generator=gen).to(dtype)
    w = torch.randn(n, HIDDEN, generator=gen).to(dtype)
    return x, counts, w


def worker_dispatcher(rank: int, world: int, args: dict) -> dict:
    from omni_moe.modeling.moe import LocalDispatcher
    from omni_moe.training.expert_parallel import AllToAllDispatcher

    dtype = getattr(torch, args["dtype"])
    case = args["case"]
    full = _full_experts(dtype)
    local = _local_experts(full, rank)
    dispatcher = AllToAllDispatcher(None, EP)

    x, counts, w = _rank_inputs(rank, case, dtype)
    x.requires_grad_(True)
    y = dispatcher(x, counts, local)
    (y.float() * w.float()).sum().backward()

    # reference: the full expert set, every rank's rows, one process
    ref_x_grad = None
    local_ref = LocalDispatcher()
    for src in range(world):
        xs, cs, ws = _rank_inputs(src, case, dtype)
        xs.requires_grad_(True)
        ys = local_ref(xs, cs, full)
        (ys.float() * ws.float()).sum().backward()
        if src == rank:
            ref_y, ref_x_grad = ys.detach(), xs.grad
    return {
        "rows": x.shape[0],
        "y": y.detach().float(), "ref_y": ref_y.float(),
        "x_grad": x.grad.float(), "ref_x_grad": ref_x_grad.float(),
        "gate_up_grad": local.gate_up_proj.grad.float(), "ref_gate_up_grad": full.gate_up_proj.grad[rank::EP].float(),
        "down_grad": local.down_proj.grad.float(), "ref_down_grad": full.down_proj.grad[rank::EP].float(),
    }


def _model_batch(rank: int, config) -> dict:
    """Rank 0: text tokens only; rank 1: image-modality tokens only (explicit modality ids)."""
    gen = torch.Generator().manual_seed(7 + rank)
    input_ids = torch.randint(2, 60, (2, 12), generator=gen)
    modality_ids = torch.full_like(input_ids, 0 if rank == 0 else config.modality_id("image"))
    return {"input_ids": input_ids, "labels": input_ids.clone(), "modality_ids": modality_ids}


def _forced_router_model(config) -> OmniMoeForCausalLM:
    """Router forced through the aux-free selection bias (it picks WHICH expert, never its weight): text tokens
    all pick expert 0, image tokens all pick expert 2 (the first of each intra pool); zero router weights make
    the routing independent of the hidden states."""
    from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
    from omni_moe.training.expert_parallel import moe_blocks

    torch.manual_seed(0)
    model = OmniMoeForCausalLM(config)
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.zero_()
            block.gate.e_score_correction_bias[[0, 2]] = 1.0
    return model


def worker_model_uneven(rank: int, world: int, args: dict) -> dict:
    """Whole model, EP=2, forced routing: losses and every gradient vs the single-process full model."""
    from tests.tiny import tiny_config
    from omni_moe.training.expert_parallel import gather_full_expert_state, local_expert_state, moe_blocks, shard_experts

    config = tiny_config(media=False, num_experts_per_tok=1, num_null_experts=0, aux_free_bias=True)
    model = _forced_router_model(config)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    shard_experts(model, None, rank, EP)

    out = model(**_model_batch(rank, config))
    (out.loss / world).backward()  # mean over ranks of per-rank mean losses
    for name, param in model.named_parameters():
        if "experts." not in name or "shared_expert" in name:  # dense: sum over data-parallel ranks
            dist.all_reduce(param.grad)

    ref = _forced_router_model(config)
    ref_losses = []
    for src in range(world):
        ref_out = ref(**_model_batch(src, config))
        (ref_out.loss / world).backward()
        ref_losses.append(ref_out.loss.detach())
    ref_grads = dict(ref.named_parameters())

    grad_diff, expert_grad_norm = 0.0, 0.0
    for name, param in model.named_parameters():
        ref_grad = ref_grads[name].grad
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            ref_grad = ref_grad[rank::EP]
            expert_grad_norm += float(param.grad.norm())
        grad_diff = max(grad_diff, float((param.grad - ref_grad).abs().max()))

    gathered = gather_full_expert_state(model)
    gather_diff = max(float((v - full_state[k]).abs().max()) for k, v in gathered.items())
    sliced = local_expert_state(full_state, rank, EP)
    own = model.state_dict()
    slice_diff = max(float((sliced[k] - own[k]).abs().max()) for k in gathered)
    loads = torch.stack([r.tokens_per_expert.sum(0) for r in out.router_outputs])
    return {
        "loss": out.loss.detach(), "ref_loss": ref_losses[rank], "grad_diff": grad_diff,
        "expert_grad_norm": expert_grad_norm, "loads": loads, "gather_diff": gather_diff, "slice_diff": slice_diff,
        "gathered_keys": sorted(gathered), "global_ids": list(moe_blocks(model)[0].experts.global_ids),
    }


def worker_single_process_init(rank: int, world: int, args: dict) -> dict:
    """No launcher variables at all: init_distributed starts a one-process group on loopback."""
    from omni_moe.training.distributed import dist_info, init_distributed, seed_everything, teardown

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    info = init_distributed(timeout_s=10, deepspeed_comm=False)
    value = torch.tensor([3.0])
    dist.all_reduce(value)
    again = dist_info()
    seed_everything(5)
    first = torch.rand(3)
    seed_everything(5)
    same = torch.equal(first, torch.rand(3))
    teardown()
    return {"world": info.world_size, "rank": info.rank, "backend": info.backend, "sum": float(value),
            "again_world": again.world_size, "reseed_same": same, "initialized_after": dist.is_initialized()}


def worker_sleep_forever(rank: int, world: int, args: dict) -> dict:
    child = subprocess.Popen(["sleep", "600"])
    with open(os.path.join(args["pid_dir"], f"grandchild{rank}"), "w") as f:
        f.write(str(child.pid))
    print(f"rank {rank} is about to sleep", file=__import__("sys").stderr, flush=True)
    time.sleep(600)
    return {}


def worker_fail_on_rank1(rank: int, world: int, args: dict) -> dict:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes
    return {}


EXPERT_GROUP_TIMEOUT_S, WORLD_TIMEOUT_S = 3.0, 60.0


def worker_expert_group_timeouts(rank: int, world: int, args: dict) -> dict:
    """Rank 0 issues a collective on an expert group that rank 1 skips (rank 1 waits in a world barrier): it must
    fail after the expert groups' own timeout, not the world group's nor torch's default. World 2: at EP=2 the EP
    group holds both ranks, at EP=1 the expert-data-parallel group does."""
    from omni_moe.training.deepspeed_moe import create_expert_parallel_groups

    out = {}
    for ep_size, attr in ((2, "ep_group"), (1, "expert_data_parallel_group")):
        group = getattr(create_expert_parallel_groups(ep_size, timeout_s=EXPERT_GROUP_TIMEOUT_S), attr)
        result = {"size": dist.get_world_size(group=group), "elapsed": None, "error": None}
        if rank == 0:
            start = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1), group=group)
            except RuntimeError as err:
                result["error"] = str(err)
            result["elapsed"] = time.monotonic() - start
        dist.barrier()
        out[attr] = result
    return out


# ----------------------------------------------------------------------------- one launch, every case
def worker_all_cases(rank: int, world: int, args: dict) -> dict:
    """All EP cases in one 2-process launch (process start-up dominates the cost of each case)."""
    return {
        "dispatch_random_fp32": worker_dispatcher(rank, world, {"case": "random", "dtype": "float32"}),
        "dispatch_uneven_fp32": worker_dispatcher(rank, world, {"case": "uneven", "dtype": "float32"}),
        "dispatch_random_bf16": worker_dispatcher(rank, world, {"case": "random", "dtype": "bfloat16"}),
        "model_uneven": worker_model_uneven(rank, world, {}),
    }


@pytest.fixture(scope="module")
def ep_results(spawn):
    return spawn(
        "tests.distributed.test_expert_parallel:worker_all_cases", EP, {}, timeout_s=150, pg_timeout_s=PG_TIMEOUT_S
    )


@pytest.mark.parametrize("case", ["random", "uneven"])
def test_all_to_all_dispatcher_matches_local_dispatcher(ep_results, case):
    """Forward and backward of the EP=2 dispatcher equal the full expert set run locally (fp32, tolerance 1e-5);
    "uneven": one rank sends all its rows to one expert, the other sends zero rows (no hang)."""
    results = [r[f"dispatch_{case}_fp32"] for r in ep_results]
    if case == "uneven":
        assert [r["rows"] for r in results] == [7, 0]
    for rank, r in enumerate(results):
        for key in ("y", "x_grad", "gate_up_grad", "down_grad"):
            assert r[key].shape == r["ref_" + key].shape, (rank, key)
            torch.testing.assert_close(r[key], r["ref_" + key], atol=1e-5, rtol=1e-5, msg=f"rank {rank} {key}")
    # the experts that saw tokens really got gradients (the comparison is not between zeros)
    assert results[0]["gate_up_grad"][0].abs().sum() > 0


def test_all_to_all_dispatcher_bf16(ep_results):
    for r in (r["dispatch_random_bf16"] for r in ep_results):
        torch.testing.assert_close(r["y"], r["ref_y"], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(r["gate_up_grad"], r["ref_gate_up_grad"], atol=5e-2, rtol=5e-2)


def test_sharded_model_with_forced_uneven_routing_matches_single_process(ep_results):
    """Whole model at EP=2 with the router forced (top-1): all of rank 0's (text) tokens go to expert 0, all of
    rank 1's (image) tokens to expert 2, both held by EP rank 0, so EP rank 1's experts get zero rows from
    everyone. No hang;
    losses and all gradients equal the single-process model on both ranks' batches; gathering the shards rebuilds
    the full expert tensors in global order."""
    from omni_moe.training.expert_parallel import global_expert_ids

    results = [r["model_uneven"] for r in ep_results]
    for rank, r in enumerate(results):
        # the forced routing really is uneven: one expert takes all of this rank's slots in every layer
        loads = r["loads"]
        assert (loads > 0).sum(dim=1).tolist() == [1] * loads.shape[0], (rank, loads)
        torch.testing.assert_close(r["loss"], r["ref_loss"], atol=1e-6, rtol=1e-6)
        assert r["grad_diff"] < 1e-5, (rank, r["grad_diff"])
        assert r["gather_diff"] == 0.0 and r["slice_diff"] == 0.0
        assert r["global_ids"] == global_expert_ids(10, rank, EP)
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in r["gathered_keys"])
    assert results[0]["loads"].argmax(dim=1).tolist() == [0, 0]  # text: first intra expert, every layer
    assert results[1]["loads"].argmax(dim=1).tolist() == [2, 2]  # image: first intra expert
    # experts 0 and 2 both live on EP rank 0: rank 1's experts receive zero rows from every rank, yet run
    assert results[0]["expert_grad_norm"] > 0 and results[1]["expert_grad_norm"] == 0.0


def test_expert_groups_time_out_after_their_own_timeout(spawn):
    """The expert-parallel and expert-data-parallel groups honour the run's timeout (torch would give a new group its
    default, 30 min for gloo and 10 min for NCCL, whatever the world group's timeout)."""
    results = spawn("tests.distributed.test_expert_parallel:worker_expert_group_timeouts", 2, {}, timeout_s=300,
                    pg_timeout_s=WORLD_TIMEOUT_S, init="deepspeed")
    for attr, result in results[0].items():
        assert result["size"] == 2, attr
        assert result["error"] is not None and "timed out" in result["error"].lower(), (attr, result)
        assert 0.9 * EXPERT_GROUP_TIMEOUT_S <= result["elapsed"] < EXPERT_GROUP_TIMEOUT_S + 12, (attr, result)


def test_expert_parallel_topology_is_deepspeeds():
    from omni_moe.training.deepspeed_moe import expert_parallel_ranks

    assert expert_parallel_ranks(8, 2) == ([[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]])
    assert expert_parallel_ranks(8, 2, use_data_before_expert_parallel=True) == (
        [[0, 4], [1, 5], [2, 6], [3, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert expert_parallel_ranks(2, 1) == ([[0], [1]], [[0, 1]])
    with pytest.raises(ValueError, match="world size \\(6\\)"):
        expert_parallel_ranks(6, 4)


def test_placement_round_robin_spreads_every_pool():
    from tests.tiny import tiny_config
    from omni_moe.training.expert_parallel import check_ep_size, global_expert_ids

    config = tiny_config(media=False)
    pools = config.expert_pools()
    for ep in (1, 2):
        owners = {g: g % ep for g in range(config.num_routed_experts)}
        for name, ids in pools.items():
            if name != "null" and len(ids) >= ep:
                assert {owners[g] for g in ids} == set(range(ep)), (name, ep)
    assert global_expert_ids(8, 1, 4) == [1, 5]
    with pytest.raises(ValueError, match="num_routed_experts \\(10\\) must be divisible"):
        check_ep_size(10, 4)
    with pytest.raises(ValueError, match="world size \\(3\\)"):
        check_ep_size(8, 2, world_size=3)


def test_local_expert_state_slices_only_expert_tensors():
    from omni_moe.training.expert_parallel import local_expert_state

    full = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.arange(4.0)[:, None].repeat(1, 3),
        "model.layers.0.mlp.shared_expert.down_proj.weight": torch.ones(2, 2),
    }
    shard = local_expert_state(full, ep_rank=1, ep_size=2)
    assert shard["model.layers.0.mlp.experts.gate_up_proj"][:, 0].tolist() == [1.0, 3.0]
    assert shard["model.layers.0.mlp.shared_expert.down_proj.weight"] is full[
        "model.layers.0.mlp.shared_expert.down_proj.weight"
    ]


def test_init_distributed_without_launcher_starts_a_one_process_group(spawn):
    (r,) = spawn("tests.distributed.test_expert_parallel:worker_single_process_init", 1, {}, timeout_s=60, init="none")
    assert (r["world"], r["rank"], r["backend"], r["sum"]) == (1, 0, "gloo", 3.0)
    assert r["again_world"] == 1 and r["reseed_same"] and not r["initialized_after"]


# ----------------------------------------------------------------------------- the spawn helper itself
def test_spawn_timeout_kills_the_whole_process_group(spawn, tmp_path):
    from conftest import WorkerTimeout

    start = time.monotonic()
    with pytest.raises(WorkerTimeout) as info:
        spawn("tests.distributed.test_expert_parallel:worker_sleep_forever", 2, {"pid_dir": str(tmp_path)},
              timeout_s=8, init="none")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "timed out" in message and "rank 0" in message and "rank 1 is about to sleep" in message
    for rank in range(2):
        pid = int((tmp_path / f"grandchild{rank}").read_text())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:  # the grandchild may linger as a zombie only until init reaps it
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().split()[2] == "Z", f"grandchild {pid} of rank {rank} survived the timeout"


def test_spawn_reports_the_failing_ranks_stderr_and_stops_the_others(spawn):
    from conftest import WorkerError

    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        spawn("tests.distributed.test_expert_parallel:worker_fail_on_rank1", 2, {}, timeout_s=60, pg_timeout_s=60)
    assert time.monotonic() - start < 40  # well before rank 0's 60 s collective timeout
    assert "boom from rank 1" in str(info.value) and "--- rank 1: exit code 1" in str(info.value)
