"""The MTP draft step (layer `num_hidden_layers` of a V3 checkpoint) against the same computation assembled from
transformers' own decoder layer: h' = eh_proj([enorm(embed(t+1)) ; hnorm(h_t)]) -> layer -> shared_head."""

from __future__ import annotations

import pytest
import torch
from deepseek_checkpoints import reference_model, write_checkpoint
from safetensors.torch import load_file

from whale.engine.paged_attention import create_cache
from whale.models.loader import load_model

PROMPT = [5, 17, 3, 99, 42, 8, 120, 77, 13, 61, 200, 4]


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _reference_draft_logits(reference, directory, ids: torch.Tensor) -> torch.Tensor:
    layers = reference.config.num_hidden_layers
    donor = reference_model("v3", seed=1, layers=layers + 1).model.layers[layers]  # the layer written as MTP
    tensors = load_file(str(directory / "model-mtp.safetensors"))
    prefix = f"model.layers.{layers}."
    hidden = reference.model(ids[None]).last_hidden_state[0, :-1]
    embedded = _rms(reference.model.embed_tokens(ids[1:]), tensors[prefix + "enorm.weight"])
    x = torch.nn.functional.linear(torch.cat((embedded, _rms(hidden, tensors[prefix + "hnorm.weight"])), -1),
                                   tensors[prefix + "eh_proj.weight"])[None]
    positions = torch.arange(len(ids) - 1)[None]
    cos_sin = reference.model.rotary_emb(x, positions)
    mask = torch.full((len(ids) - 1, len(ids) - 1), float("-inf")).triu(1)[None, None]
    out = donor(x, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)[0]
    return reference.lm_head(_rms(out, tensors[prefix + "shared_head.norm.weight"]))


@torch.inference_mode()
def test_mtp_draft_matches_reference_composition(tmp_path):
    directory = tmp_path / "v3_mtp"
    reference = write_checkpoint("v3", directory, seed=0, mtp=True)
    model = load_model(str(directory), dtype="float32", device="cpu").model
    assert model.num_mtp_layers == 1
    ids = torch.tensor(PROMPT)
    cache = create_cache(model.kv_cache_spec(), torch.float32, torch.device("cpu"))
    cache.begin_step([0], [len(ids)])
    hidden = model(ids, torch.arange(len(ids)), cache)
    cache.end_step()
    # the draft layer's own latent cache; first the prompt minus one token, then one decode step
    mtp_cache = create_cache(model.mtp_kv_cache_spec(), torch.float32, torch.device("cpu"))
    drafts = []
    for start, count in ((0, len(ids) - 3), (len(ids) - 3, 2)):
        mtp_cache.begin_step([0], [count])
        span = slice(start, start + count)
        draft = model.draft_hidden(hidden[span], ids[start + 1:start + 1 + count], torch.arange(start, start + count),
                                   mtp_cache)
        mtp_cache.end_step()
        drafts.append(model.compute_draft_logits(draft))
    expected = _reference_draft_logits(reference, directory, ids)
    assert (torch.cat(drafts) - expected).abs().max() <= 1e-4


@torch.inference_mode()
def test_checkpoint_without_mtp_tensors_drops_the_mtp_layer(tmp_path):
    directory = tmp_path / "v3_plain"
    write_checkpoint("v3", directory)
    loaded = load_model(str(directory), dtype="float32", device="cpu")
    assert loaded.config.num_nextn_predict_layers == 1 and loaded.model.num_mtp_layers == 0


@torch.inference_mode()
def test_the_engine_drafts_what_the_mtp_layer_predicts_and_keeps_greedy_replies(tmp_path):
    """`speculative="mtp"`: after every step, each request's draft is the argmax of the reference composition's
    draft logits over its tokens so far (the last position, with the token just sampled); the replies equal the
    engine's without drafts, at one draft a step and at three (the layer reused on its own output)."""
    from whale import SamplingParams
    from whale.engine.llm_engine import EngineConfig, LLMEngine

    directory = tmp_path / "v3_mtp"
    reference = write_checkpoint("v3", directory, seed=0, mtp=True)
    loaded = load_model(str(directory), dtype="float32", device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:5] + [9, 9, 9], PROMPT * 3]
    plain = LLMEngine(loaded, EngineConfig())
    expected = [plain.add_request(p, params) for p in prompts]
    while plain.has_unfinished():
        plain.step()
    engine = LLMEngine(loaded, EngineConfig(speculative="mtp", block_size=4, max_num_batched_tokens=20))
    requests = [engine.add_request(p, params) for p in prompts]
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for request in requests:
            if request.draft_token_ids:
                ids = torch.tensor(list(request.all_token_ids))
                assert request.draft_token_ids == [int(_reference_draft_logits(reference, directory, ids)[-1].argmax())]
                checked += 1
    assert checked >= 20
    assert [list(r.output_token_ids) for r in requests] == [list(r.output_token_ids) for r in expected]
    deep = LLMEngine(loaded, EngineConfig(speculative="mtp", num_speculative_tokens=3))
    requests = [deep.add_request(p, params) for p in prompts]
    while deep.has_unfinished():
        deep.step()
    assert [list(r.output_token_ids) for r in requests] == [list(r.output_token_ids) for r in expected]
    assert deep.speculation.drafted > 3 * 12


def test_mtp_drafts_need_the_mtp_layer(tmp_path):
    from whale.engine.llm_engine import EngineConfig, LLMEngine
    from whale.errors import InvalidRequestError

    write_checkpoint("v3", tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    with pytest.raises(InvalidRequestError, match="multi-token-prediction layer"):
        LLMEngine(loaded, EngineConfig(speculative="mtp"))
