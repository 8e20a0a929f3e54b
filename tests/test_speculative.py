"""Speculative decoding: drafts change how many tokens a step yields, never which. Greedy replies equal the plain
engine's token for token (fp32 dense and int4 kernels, DeepSeek MLA+MoE, ragged batches with prefix hits, chunked
prefill and preemption); seeded sampled replies too; unseeded, the tokens follow the model's own distribution (a
chi-square test against the probabilities the model gives); and the cache keeps no rejected draft."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from types import SimpleNamespace

import jsonschema_rs
import pytest
import torch
from replay_proposer import ReplayProposer

from whale import LLM, SamplingParams
from whale.engine.llm_engine import EngineConfig, LLMEngine
from whale.engine.proposers import NgramProposer, build_proposer
from whale.errors import InvalidRequestError
from whale.sampling_params import StructuredOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
DOCUMENT = ("The quarterly report shows revenue grew by twelve percent, driven by strong sales in the northern "
            "region. Operating costs rose slightly because of new hires in engineering and support.")
CODE = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
        "def fibonacci_memo(n")


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = GREEDY,
         ids: list[str] | None = None):
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = ids or [None] * len(prompts)
    requests = [engine.add_request(p, sp, request_id=i) for p, sp, i in zip(prompts, params, ids, strict=True)]
    while engine.has_unfinished():
        engine.step()
    return requests


def _outputs(requests) -> list[list[int]]:
    return [list(r.output_token_ids) for r in requests]


@pytest.fixture(scope="module")
def prompts(default_llm):
    tokenizer = default_llm.tokenizer
    copy = default_llm.chat_prompt([{"role": "user", "content": f"Repeat this text exactly:\n\n{DOCUMENT}"}]).ids
    return [copy, tokenizer.encode(CODE), tokenizer.encode("Once upon a time, in a small village by the sea,"),
            tokenizer.encode("1, 2, 3, 4, 5, 6, 7, 8,")]


# -- the n-gram proposer ------------------------------------------------------------------------------------------

def _lookup(tokens: list[int], limit: int, min_n: int, max_n: int) -> list[int]:
    """Brute force: what followed the latest earlier occurrence of the longest suffix of n in [min_n, max_n]."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        suffix = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):
            if tokens[end - n:end] == suffix:
                return tokens[end:end + limit]
    return []


def test_ngram_drafts_follow_the_latest_occurrence_of_the_longest_recurring_suffix():
    rng = random.Random(0)
    proposer = NgramProposer(min_n=2, max_n=4)
    for sequence in range(20):
        tokens = [rng.randrange(5) for _ in range(8)]
        request = SimpleNamespace(request_id=f"r{sequence}", all_token_ids=tokens, num_tokens=0)
        for _ in range(60):  # the index is built incrementally as the sequence grows, a few tokens at a time
            tokens.extend(rng.randrange(5) for _ in range(rng.randint(1, 3)))
            request.num_tokens = len(tokens)
            limit = rng.randint(1, 6)
            assert proposer.draft(request, limit) == _lookup(tokens, limit, 2, 4)
        proposer.release(request.request_id)
    assert not proposer._indexes


def test_speculative_options_are_checked():
    assert build_proposer("off", None) == (None, 0)
    assert build_proposer("ngram", None)[1] == 3
    for method, count in (("ngram", 0), ("ngram", 8), ("medusa", 2)):
        with pytest.raises(InvalidRequestError):
            build_proposer(method, count)


# -- greedy: the same tokens ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernels(default_llm):
    """The default model in fp32 under a row-independent kernel family, loaded once: `dense` or `int4` (hybrid
    switches kernels by a step's row count, so its greedy replies depend on the batch, drafts or not)."""
    loaded = {}
    return lambda name: loaded.setdefault(name, LLM("default", dtype="float32", kernels=name).loaded)


@pytest.fixture(scope="module")
def int4(kernels):
    return kernels("int4")


@pytest.mark.parametrize(("family", "options"), [
    ("int4", {}),
    # chunked prefill, drafts cut short: drafts take only the budget left, so the prompts are chunked as without
    # them, and decode tokens beside a prompt chunk are computed as in a decode step
    ("int4", {"max_num_batched_tokens": 6, "enable_prefix_caching": False}),
    # preemption: blocks run out, drafts are dropped first. A preempted request's tokens are recomputed as a
    # prompt, with the prompt kernels: only where those compute a row as decoding does (dense fp32) is the reply
    # the unpreempted one, drafts or not
    ("dense", {"block_size": 4, "num_kv_blocks": 32}),
], ids=["roomy", "chunked", "preempting"])
def test_greedy_replies_are_the_same_with_ngram_drafts(kernels, prompts, family, options):
    loaded = kernels(family)
    params = GREEDY if family == "int4" else replace(GREEDY, max_tokens=24)  # fp32 dense is slow on a CPU
    budget = {k: v for k, v in options.items() if k == "max_num_batched_tokens"}  # prompts chunked alike
    plain = _outputs(_run(LLMEngine(loaded, EngineConfig(enable_prefix_caching=False, **budget)), prompts, params))
    engine = LLMEngine(loaded, EngineConfig(speculative="ngram", num_speculative_tokens=4, **options))
    first = _run(engine, prompts, params)
    assert _outputs(first) == plain
    assert engine.speculation.accepted > 10 and engine.speculation.accepted < engine.speculation.drafted
    if "num_kv_blocks" in options:
        assert sum(r.num_preemptions for r in first) > 0, "the cache is small enough to preempt"
    if not options:
        again = _run(engine, prompts, params)  # prefix hits on blocks written by verified drafts
        assert _outputs(again) == plain and sum(r.num_cached_tokens for r in again) > 0


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A tiny random DeepSeek-V3 (MLA, MoE; a 256-token vocabulary) in fp32."""
    from reference.deepseek_checkpoints import write_checkpoint

    directory = tmp_path_factory.mktemp("v3")
    write_checkpoint("v3", directory, seed=3)
    return LLM(str(directory), dtype="float32").loaded


def test_greedy_deepseek_replies_are_the_same_with_drafts(deepseek):
    model = deepseek
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (5, 23, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain = _outputs(_run(LLMEngine(model, EngineConfig()), prompts, params))
    ngram = LLMEngine(model, EngineConfig(speculative="ngram", block_size=4, max_num_batched_tokens=16))
    assert _outputs(_run(ngram, prompts, params)) == plain
    replayed = LLMEngine(model, EngineConfig(block_size=4))
    replayed.proposer, replayed.num_speculative_tokens = ReplayProposer(
        {f"r{i}": reply for i, reply in enumerate(plain)}, 256, wrong_every=5), 6
    assert _outputs(_run(replayed, prompts, params, ids=["r0", "r1", "r2"])) == plain
    assert replayed.speculation.accepted > 40


class FailingProposer:
    def propose(self, step, room):
        raise RuntimeError("out of memory")

    def release(self, request_id):
        pass


def test_a_failing_proposer_costs_the_drafts_only(deepseek, caplog):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = _outputs(_run(LLMEngine(deepseek, EngineConfig()), [[5, 6, 7]], params))
    engine = LLMEngine(deepseek, EngineConfig())
    engine.proposer, engine.num_speculative_tokens = FailingProposer(), 2
    assert _outputs(_run(engine, [[5, 6, 7]], params)) == plain
    assert "the draft proposer failed" in caplog.text and "out of memory" in caplog.text


def test_an_abort_mid_speculation_frees_everything(deepseek):
    engine = LLMEngine(deepseek, EngineConfig(speculative="ngram", block_size=4))
    total = engine.cache.blocks.num_free_blocks
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    requests = [engine.add_request([5, 6, 7, 5, 6, 7, 5, 6], params) for _ in range(3)]
    while not any(r.draft_token_ids for r in requests):
        engine.step()
    engine.abort(requests[1].request_id)
    assert requests[1].finish_reason == "abort" and requests[1].request_id not in engine.proposer._indexes
    while engine.has_unfinished():
        engine.step()
    assert engine.cache.blocks.num_free_blocks == total and not engine.proposer._indexes


# -- sampling: the same distribution -------------------------------------------------------------------------------

def test_seeded_sampled_replies_and_logprobs_are_the_same_with_drafts(int4, prompts):
    params = [SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=seed, max_tokens=40,
                             ignore_eos=True, logprobs=2) for seed in range(len(prompts))]
    plain = _run(LLMEngine(int4, EngineConfig()), prompts, params)
    ids = [f"r{i}" for i in range(len(prompts))]
    engine = LLMEngine(int4, EngineConfig(speculative="ngram", num_speculative_tokens=5))
    engine.proposer = ReplayProposer(dict(zip(ids, _outputs(plain), strict=True)), 49152, wrong_every=7)
    drafted = _run(engine, prompts, params, ids)
    assert _outputs(drafted) == _outputs(plain)
    assert [r.logprobs for r in drafted] == [r.logprobs for r in plain]
    assert engine.speculation.accepted > 100
    assert sorted(engine.proposer.released) == ids  # every finished request's proposer state is dropped


class FixedDrafts:
    """Drafts the same tokens for every request (a test double: a proposer whose guesses are known)."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def propose(self, step, room):
        return [self.tokens[:limit] for limit in room]

    def release(self, request_id):
        pass


def _top2(loaded, ids: list[int]) -> dict[int, float]:
    """The model's probabilities of its two most likely next tokens, renormalised (top_k=2 at temperature 1)."""
    (request,) = _run(LLMEngine(loaded, EngineConfig()), [ids], SamplingParams(temperature=0.0, max_tokens=1,
                                                                                logprobs=2))
    logprobs = {request.logprobs[0].token_id: request.logprobs[0].logprob, **request.logprobs[0].top_logprobs}
    norm = torch.logsumexp(torch.tensor(list(logprobs.values()), dtype=torch.float64), 0)
    return {t: float(torch.exp(torch.tensor(lp, dtype=torch.float64) - norm)) for t, lp in logprobs.items()}


def test_sampled_tokens_follow_the_models_distribution(deepseek):
    """Four tokens at top_k=2, temperature 1, with two drafted tokens verified behind the first, on the tiny
    DeepSeek: the frequencies of the 16 possible replies against the probabilities the model gives them, by a
    chi-square test at a 0.1% significance level (a correct engine fails it one run in a thousand; the seeds are
    fixed, so it is the same run each time)."""
    prompt = [7, 19, 101, 42, 5]
    exact = {(): 1.0}
    for _ in range(4):
        exact = {seq + (t,): p * q for seq, p in exact.items()
                 for t, q in _top2(deepseek, prompt + list(seq)).items()}
    likely = max(exact, key=exact.get)
    engine = LLMEngine(deepseek, EngineConfig(max_num_seqs=256))
    engine.proposer, engine.num_speculative_tokens = FixedDrafts(list(likely[1:3])), 2
    draws = 2000
    params = [SamplingParams(temperature=1.0, top_k=2, max_tokens=4, ignore_eos=True, seed=10_000 + i)
              for i in range(draws)]
    counts: dict[tuple[int, ...], int] = {}
    for request in _run(engine, [prompt] * draws, params):
        key = tuple(request.output_token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    assert engine.speculation.accepted > draws // 4  # the drafts were verified, and often kept
    # cells expected fewer than 5 times are pooled, as the test requires
    cells, pooled_expected, pooled_seen = [], 0.0, 0
    for key, p in exact.items():
        if p * draws >= 5:
            cells.append((p * draws, counts.get(key, 0)))
        else:
            pooled_expected, pooled_seen = pooled_expected + p * draws, pooled_seen + counts.get(key, 0)
    if pooled_expected:
        cells.append((pooled_expected, pooled_seen))
    statistic = sum((seen - expected) ** 2 / expected for expected, seen in cells)
    p_value = float(torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    assert p_value > 0.001, (statistic, len(cells))


# -- controls, lengths and the cache under speculation ----------------------------------------------------------

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
          "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer"}}}


def test_grammar_min_tokens_and_stops_hold_the_same_with_drafts(int4, prompts):
    grammar = StructuredOutput("json_schema", json.dumps(SCHEMA))
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=60, structured_output=grammar)
              for seed in range(4)]
    params += [SamplingParams(temperature=0.7, seed=9, max_tokens=30, min_tokens=20, stop_token_ids=[13, 28]),
               SamplingParams(temperature=0.0, max_tokens=40, stop=[" sales", "fibonacci(n - 2"])]
    batch = [prompts[0]] * 4 + prompts[1:3]
    ids = [f"r{i}" for i in range(len(batch))]
    plain = _run(LLMEngine(int4, EngineConfig()), batch, params)
    engine = LLMEngine(int4, EngineConfig())
    engine.proposer, engine.num_speculative_tokens = ReplayProposer(
        dict(zip(ids, _outputs(plain), strict=True)), 49152, wrong_every=4), 7
    drafted = _run(engine, batch, params, ids)
    assert [(r.text, r.finish_reason, r.stop_reason) for r in drafted] == \
        [(r.text, r.finish_reason, r.stop_reason) for r in plain]
    validator = jsonschema_rs.validator_for(SCHEMA)
    for request in drafted[:4]:
        if request.finish_reason == "stop":
            validator.validate(json.loads(request.text))
    assert len(drafted[4].output_token_ids) >= 20
    assert engine.speculation.accepted > 60


def test_drafts_never_pass_a_length_limit(int4, prompts):
    prompt = prompts[1]
    limits = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in range(1, 8)]
    plain = _run(LLMEngine(int4, EngineConfig()), [prompt] * 7, limits)
    ids = [f"r{i}" for i in range(7)]
    engine = LLMEngine(int4, EngineConfig())
    engine.proposer, engine.num_speculative_tokens = ReplayProposer(
        {i: list(plain[-1].output_token_ids) for i in ids}, 49152), 7
    assert [len(r.output_token_ids) for r in _run(engine, [prompt] * 7, limits, ids)] == list(range(1, 8))
    # the context's end: the last position computed is the model length's last
    short = LLMEngine(int4, EngineConfig(max_model_len=len(prompt) + 5))
    short.proposer, short.num_speculative_tokens = ReplayProposer({"r": list(plain[-1].output_token_ids)}, 49152), 7
    (request,) = _run(short, [prompt], SamplingParams(temperature=0.0, ignore_eos=True), ["r"])
    assert request.finish_reason == "length" and request.num_tokens == len(prompt) + 5
    assert list(request.output_token_ids) == list(plain[-1].output_token_ids)[:5]


def test_refused_drafts_never_reach_the_prefix_cache(int4, prompts):
    """Half the drafts are wrong. Every block the drafted run registers for prefix hits holds, bit for bit, the
    K/V the plain engine registers under the same hash; and its reply, fed back as a prompt, is served from those
    blocks and continues as on the plain engine."""

    def run_and_follow(engine):
        (first,) = _run(engine, [prompts[2]], GREEDY, ["r"])
        (hit,) = _run(engine, [list(first.all_token_ids)], GREEDY, ["again"])
        return first, hit

    plain = LLMEngine(int4, EngineConfig(block_size=4))
    expected_first, expected_hit = run_and_follow(plain)
    engine = LLMEngine(int4, EngineConfig(block_size=4))
    engine.proposer, engine.num_speculative_tokens = ReplayProposer(
        {"r": list(expected_first.output_token_ids)}, 49152, wrong_every=2), 3
    first, hit = run_and_follow(engine)
    assert 0 < engine.speculation.accepted < engine.speculation.drafted
    assert list(first.output_token_ids) == list(expected_first.output_token_ids)
    assert hit.num_cached_tokens == expected_hit.num_cached_tokens >= first.num_tokens - 8
    assert list(hit.output_token_ids) == list(expected_hit.output_token_ids)
    size = engine.cache.block_size
    assert engine.cache.blocks.cached.keys() == plain.cache.blocks.cached.keys()
    for block_hash, block in engine.cache.blocks.cached.items():
        other = plain.cache.blocks.cached[block_hash]
        for name, store in engine.cache.stores.items():
            assert torch.equal(store[:, block * size:(block + 1) * size],
                               plain.cache.stores[name][:, other * size:(other + 1) * size])
