"""Parameter counts derived by hand from the published configs (docs/sources.md §3)."""

import pytest

from whale.planner.catalog import CATALOG
from whale.planner.params import count_params


def within(value: float, published: float, tolerance: float = 0.005) -> bool:
    return abs(value / published - 1) <= tolerance


def test_deepseek_v3_total_active_and_mtp_by_hand():
    h, layers, dense, heads, vocab = 7168, 61, 3, 128, 129280
    moe = layers - dense
    attention = (
        1536 * h + 1536  # q_a_proj + q_a_layernorm
        + heads * (128 + 64) * 1536  # q_b_proj: 128 heads of nope 128 + rope 64
        + (512 + 64) * h + 512  # kv_a_proj_with_mqa (latent + shared rope key) + kv_a_layernorm
        + heads * (128 + 128) * 512  # kv_b_proj: per head k_nope 128 + v 128 from the 512 latent
        + h * heads * 128  # o_proj
        + 2 * h  # input and post-attention RMSNorm
    )
    expert = 3 * h * 2048  # gate, up, down of one routed expert (moe_intermediate_size 2048)
    dense_mlp = 3 * h * 18432
    router = 256 * h + 256  # gate weight + e_score_correction_bias
    moe_mlp = 256 * expert + 1 * expert + router  # 256 routed + 1 shared
    embed = vocab * h
    total = layers * attention + dense * dense_mlp + moe * moe_mlp + 2 * embed + h  # + untied head + final norm
    # active: 8 of 256 routed experts, no embedding table (one row is read)
    active = layers * attention + dense * dense_mlp + moe * (9 * expert + router) + embed + h
    mtp = 3 * h + 2 * h * h + attention + moe_mlp  # enorm, hnorm, head norm; eh_proj; one MoE layer

    count = count_params(CATALOG["deepseek-v3"])
    assert (count.total, count.active, count.mtp) == (total, active, mtp)
    assert within(count.total, 671e9)  # README_WEIGHTS: 671B main model
    assert within(count.active, 36.7e9)  # 36.7B activated
    assert within(count.checkpoint, 685e9)  # the HF page counts MTP and its copy of embedding + head


def test_v3_family_shares_the_count():
    v3 = count_params(CATALOG["deepseek-v3"])
    for name in ("deepseek-r1", "deepseek-r1-0528", "deepseek-v3-0324", "deepseek-v3.1", "deepseek-prover-v2"):
        assert count_params(CATALOG[name]) == v3


def test_deepseek_v2_lite_by_hand():
    h, layers, heads = 2048, 27, 16
    attention = (
        heads * (128 + 64) * h  # q_proj: no q compression in V2-Lite
        + (512 + 64) * h + 512 + heads * (128 + 128) * 512 + h * heads * 128 + 2 * h
    )
    expert = 3 * h * 1408
    moe_mlp = 64 * expert + 2 * expert + 64 * h  # 64 routed, 2 shared, router (no bias in V2)
    dense_mlp = 3 * h * 10944
    total = layers * attention + dense_mlp + (layers - 1) * moe_mlp + 2 * 102400 * h + h
    active = layers * attention + dense_mlp + (layers - 1) * (8 * expert + 64 * h) + 102400 * h + h
    count = count_params(CATALOG["deepseek-v2-lite"])
    assert (count.total, count.active, count.mtp) == (total, active, 0)
    assert within(count.total, 15.7e9)  # HF: 15.7B
    assert within(count.active, 2.4e9, 0.03)  # "2.4B activated" is rounded to one decimal


def test_deepseek_v32_adds_the_indexer():
    h = 7168
    indexer = 64 * 128 * 1536 + 128 * h + 64 * h + 2 * 128  # wq_b, wk, weights_proj, k_norm weight + bias
    v3, v32 = count_params(CATALOG["deepseek-v3"]), count_params(CATALOG["deepseek-v3.2"])
    assert v32.total - v3.total == 61 * indexer
    assert v32.mtp - v3.mtp == indexer  # the MTP layer has one too
    assert within(v32.total, 671e9)
    assert within(v32.checkpoint, 685e9)  # HF page of V3.2: 685B


@pytest.mark.parametrize("name, hidden, layers, heads, kv, ffn, vocab, bias, published", [
    ("r1-distill-llama-8b", 4096, 32, 32, 8, 14336, 128256, False, 8.03e9),
    ("r1-distill-qwen-7b", 3584, 28, 28, 4, 18944, 152064, True, 7.62e9),
])
def test_distills_by_hand(name, hidden, layers, heads, kv, ffn, vocab, bias, published):
    q, k = heads * 128, kv * 128  # head_dim 128
    attention = q * hidden + 2 * k * hidden + hidden * q + ((q + 2 * k) if bias else 0)
    layer = attention + 3 * hidden * ffn + 2 * hidden
    total = layers * layer + 2 * vocab * hidden + hidden  # untied embedding and head, final norm
    count = count_params(CATALOG[name])
    assert count.total == total
    assert count.active == total - vocab * hidden  # dense: everything but the embedding table
    assert within(count.total, published)


def test_every_catalog_model_is_near_its_card():
    for spec in CATALOG.values():
        if spec.published_total and spec.name != "deepseek-v4-pro":  # "1.6T" is rounded to two digits
            assert within(count_params(spec).total, spec.published_total), spec.name
    pro = count_params(CATALOG["deepseek-v4-pro"])
    assert within(pro.total, 1.6e12, 0.025)
