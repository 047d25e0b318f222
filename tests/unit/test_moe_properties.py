"""Property tests of modality-aware routing: random pools, modalities, null experts, top-k, top-p and aux-free bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omni_moe.modeling.configuration_omni import OmniMoeConfig
from omni_moe.modeling.moe import LocalDispatcher, OmniSparseMoeBlock

D = 8
MODALITY_NAMES = ["text", "image", "video", "audio"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class CountingDispatcher(LocalDispatcher):
    """Counts the rows that reach the experts: null-routed and top-p-dropped slots must never get here."""

    def __init__(self):
        self.rows = 0
        self.tokens_per_expert_total = 0

    def __call__(self, x_sorted, tokens_per_expert, experts):
        self.rows += x_sorted.shape[0]
        self.tokens_per_expert_total += int(tokens_per_expert.sum())
        return super().__call__(x_sorted, tokens_per_expert, experts)


@dataclass
class Setup:
    config: OmniMoeConfig
    modality_ids: torch.Tensor
    token_mask: torch.Tensor
    seed: int

    def __iter__(self):
        return iter((self.config, self.modality_ids, self.token_mask, self.seed))

    def __repr__(self) -> str:  # the config's own repr runs to a hundred lines
        c = self.config
        return (
            f"Setup(modalities={c.modalities}, intra={c.num_intra_experts}, inter={c.num_inter_experts}, "
            f"use_inter_pool={c.use_inter_pool}, null={c.num_null_experts}, top_k={c.num_experts_per_tok}, "
            f"top_p={c.moe_top_p}, norm={c.norm_topk_prob}, aux_free_bias={c.aux_free_bias}, "
            f"modality_ids={self.modality_ids.tolist()}, token_mask={self.token_mask.int().tolist()}, seed={self.seed})"
        )


@st.composite
def moe_setups(draw):
    """A valid random layer layout plus a random batch (modality ids, padding mask)."""
    n_modalities = draw(st.integers(1, 4))
    modalities = MODALITY_NAMES[:n_modalities]
    intra = {m: draw(st.integers(0, 3)) for m in modalities}
    use_inter_pool = draw(st.booleans())
    inter = draw(st.integers(0, 3))
    if not use_inter_pool or inter == 0:
        intra = {m: max(n, 1) for m, n in intra.items()}  # every modality must reach a weighted expert
    null = draw(st.integers(0, 3))
    smallest_pool = min(intra[m] + (inter if use_inter_pool else 0) + null for m in modalities)
    config = OmniMoeConfig(
        vocab_size=32, hidden_size=D, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, modalities=modalities, num_intra_experts=intra, num_inter_experts=inter,
        use_inter_pool=use_inter_pool, num_null_experts=null, num_shared_experts=0, moe_intermediate_size=8,
        num_experts_per_tok=draw(st.integers(1, min(smallest_pool, 4))),
        moe_top_p=draw(st.none() | st.floats(0.05, 1.0)), norm_topk_prob=draw(st.booleans()),
        aux_free_bias=draw(st.booleans()),
    )
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    modality_ids = torch.randint(0, n_modalities, (batch, seq), generator=generator)
    token_mask = torch.rand(batch, seq, generator=generator) < 0.7
    return Setup(config, modality_ids, token_mask, seed)


def build(config: OmniMoeConfig, seed: int) -> OmniSparseMoeBlock:
    torch.manual_seed(seed)
    block = OmniSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.5)
        if config.aux_free_bias:
            block.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    block.dispatcher = CountingDispatcher()
    return block


def routed(block, x, modality_ids):
    """(columns [N, k], kept [N, k] bool, probs [N, C]) for flat tokens."""
    decision = block.route(x.reshape(-1, D), modality_ids.reshape(-1))
    kept = decision.kept if decision.kept is not None else torch.ones_like(decision.columns, dtype=torch.bool)
    return decision.columns, kept, decision.probs


@SETTINGS
@given(moe_setups())
def test_tokens_only_reach_allowed_columns(setup):
    config, modality_ids, _, seed = setup
    block = build(config, seed)
    x = torch.randn(*modality_ids.shape, D)
    columns, _, probs = routed(block, x, modality_ids)
    allowed = torch.tensor(config.allowed_experts())[modality_ids.reshape(-1)]
    assert allowed.gather(1, columns).all()  # every chosen slot, kept or dropped, padding included
    assert not probs[~allowed].any()
    stats = block(x, modality_ids)[1]
    assert not stats.tokens_per_expert[~torch.tensor(config.allowed_experts())].any()


@SETTINGS
@given(moe_setups())
def test_top_p_keeps_the_fewest_experts_reaching_p(setup):
    config, modality_ids, _, seed = setup
    block = build(config, seed)
    columns, kept, probs = routed(block, torch.randn(*modality_ids.shape, D), modality_ids)
    k, p = config.num_experts_per_tok, config.moe_top_p
    picked = probs.gather(1, columns)
    assert (kept.sum(1) >= 1).all() and (kept.sum(1) <= k).all()
    assert (picked[:, :-1] >= picked[:, 1:]).all() or p is None or k == 1  # kept set walks picks by probability
    for token in range(columns.shape[0]):
        n_kept = int(kept[token].sum())
        assert kept[token, :n_kept].all()  # a prefix of the picks
        if p is None:
            assert n_kept == k
            continue
        mass = picked[token].cumsum(0)
        if n_kept < k:
            assert mass[n_kept - 1] >= p - 1e-6  # the kept experts reach p ...
        if n_kept > 1:
            assert mass[n_kept - 2] < p + 1e-6  # ... and one fewer would not


@SETTINGS
@given(moe_setups())
def test_null_and_dropped_slots_cost_nothing_and_add_nothing(setup):
    config, modality_ids, token_mask, seed = setup
    block = build(config, seed)
    x = torch.randn(*modality_ids.shape, D)
    columns, kept, _ = routed(block, x, modality_ids)
    out, stats = block(x, modality_ids, token_mask)
    computed = kept & (columns < config.num_routed_experts)
    assert block.dispatcher.rows == int(computed.sum()) == block.dispatcher.tokens_per_expert_total
    only_null = ~computed.any(1)  # tokens whose every kept slot is a null expert (no shared expert here)
    assert torch.equal(out.reshape(-1, D)[only_null], torch.zeros(int(only_null.sum()), D))
    real_kept = kept & token_mask.reshape(-1, 1)
    expected_null = (real_kept & (columns >= config.num_routed_experts)).sum() / real_kept.sum().clamp_min(1)
    assert torch.allclose(stats.null_fraction, expected_null.float())


@SETTINGS
@given(moe_setups())
def test_statistics_count_kept_slots_of_real_tokens(setup):
    config, modality_ids, token_mask, seed = setup
    block = build(config, seed)
    x = torch.randn(*modality_ids.shape, D)
    _, kept, probs = routed(block, x, modality_ids)
    stats = block(x, modality_ids, token_mask)[1]
    real = token_mask.reshape(-1)
    assert stats.tokens_per_expert.shape == (config.num_modalities, config.num_router_columns)
    assert stats.tokens_per_expert.sum() == kept[real].sum()
    per_modality = torch.zeros(config.num_modalities).index_add_(0, modality_ids.reshape(-1)[real], probs[real].sum(1))
    assert torch.allclose(stats.prob_mass.sum(1), per_modality, atol=1e-5)
    assert torch.isfinite(stats.aux_loss) and torch.isfinite(stats.z_loss)
    largest_pool = torch.tensor(config.allowed_experts())[:, : config.num_routed_experts].sum(1).max()
    assert 0.0 <= stats.aux_loss <= largest_pool + 1e-5  # pool_size * sum_e f_e * P_e with f, P distributions
