"""Router-health alarm and loss-spike detector (a 10x loss jump is flagged, a normal run is not; a router collapsed
onto one expert raises the alarm, a uniform one does not), and the TensorBoard writer."""

import random

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omni_moe.modeling.moe import OmniSparseMoeBlock
from tests.tiny import tiny_config
from omni_moe.training.metrics import LossSpikeDetector, MetricsWriter, RouterHealth


def routed(block, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, block.gate.weight.shape[1], generator=g)
    modality = torch.randint(0, 4, (1, tokens), generator=g)
    with torch.no_grad():
        return block(x, modality)[1]


def test_uniform_router_is_healthy_and_collapsed_router_raises_the_alarm():
    config = tiny_config(media=False, num_null_experts=0)
    block = OmniSparseMoeBlock(config)
    torch.nn.init.normal_(block.gate.weight, std=1e-4)  # ~uniform probabilities: load spreads evenly
    health = RouterHealth(config)
    for s in range(4):
        health.update([routed(block, seed=s)])
    report = health.report()
    assert report.pools and report.dead_experts == 0 and not report.alarms(health.max_over_mean), report

    # collapse: the first expert of each pool gets a huge logit for every (positive) input, the rest none
    with torch.no_grad():
        block.gate.weight.zero_()
        for pool, ids in config.expert_pools().items():
            if len(ids) and pool != "null":
                block.gate.weight[ids[0]] = 50.0
    for s in range(4):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(1, 512, config.hidden_size, generator=g).abs() + 0.5
        modality = torch.randint(0, 4, (1, 512), generator=g)
        with torch.no_grad():
            health.update([block(x, modality)[1]])
    report = health.report()
    alarms = report.alarms(health.max_over_mean)
    assert report.dead_experts > 0 and report.worst_max_over_mean == 2.0  # pools of 2: one expert takes all
    assert any("dead experts" in a for a in alarms) and any("max/mean" in a for a in alarms)


def test_spike_detector_flags_a_10x_jump_and_not_a_normal_run():
    rng = random.Random(0)
    detector = LossSpikeDetector()  # default: 5x the recent median
    normal = [6.0 * 0.995**i * (1 + 0.2 * rng.uniform(-1, 1)) for i in range(500)]
    assert not any(detector.update(v) for v in normal)
    assert detector.update(normal[-1] * 10.5)
    assert not detector.update(normal[-1])  # the spike did not become the new baseline
    restored = LossSpikeDetector()
    restored.load_state_dict(detector.state_dict())
    assert restored.update(normal[-1] * 11)


def test_tensorboard_writer_writes_scalars(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in range(3):
        writer.scalars({"train/loss": 3.0 - step, "train/nan": float("nan")}, step)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [3.0, 2.0, 1.0]
    assert "train/nan" not in events.Tags()["scalars"]
