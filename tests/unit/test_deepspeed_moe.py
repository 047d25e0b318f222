"""The set-up steps before the engine, without processes: `check_ready_for_engine` names the step that is missing
(sharding, markers, tags), and the tags and markers are what DeepSpeed reads."""

import pytest
import torch

from omni_moe.modeling.modeling_omni import OmniMoeForCausalLM
from tests.tiny import tiny_config
from omni_moe.training.deepspeed_moe import (
    MARKER_ATTR,
    ExpertParallelLayout,
    check_ready_for_engine,
    expert_parameters,
    install_moe_markers,
    tag_expert_parameters,
)
from omni_moe.training.expert_parallel import moe_blocks, shard_experts


def test_check_ready_for_engine_names_the_missing_step():
    from deepspeed.moe.utils import is_moe_param

    torch.manual_seed(0)
    model = OmniMoeForCausalLM(tiny_config(media=False))
    layout = ExpertParallelLayout(ep_size=1, ep_rank=0, group_name="ep_size_1", ep_group=None,
                                  expert_data_parallel_group=None, expert_data_parallel_size=1)
    with pytest.raises(RuntimeError, match="prepare_expert_parallel"):
        check_ready_for_engine(model, layout)
    shard_experts(model, None, 0, 1)  # EP=1: bookkeeping only, no process group needed
    with pytest.raises(RuntimeError, match="install_moe_markers"):
        check_ready_for_engine(model, layout)
    assert install_moe_markers(model, 1) == len(moe_blocks(model)) > 0
    with pytest.raises(RuntimeError, match="tag_expert_parameters"):
        check_ready_for_engine(model, layout)
    assert tag_expert_parameters(model, 1) == len(expert_parameters(model)) == 2 * len(moe_blocks(model))
    check_ready_for_engine(model, layout)
    assert all(is_moe_param(p) and p.group_name == "ep_size_1" for p in expert_parameters(model))
    marker = getattr(moe_blocks(model)[0], MARKER_ATTR)
    assert marker.ep_size == 1 and marker.num_experts == model.config.num_routed_experts
    assert not any("marker" in key for key in model.state_dict())  # markers add nothing to checkpoints
    tag_expert_parameters(model, 2)  # tagged for another EP size than the layout's
    with pytest.raises(RuntimeError, match="not tagged for ep_size_1"):
        check_ready_for_engine(model, layout)
