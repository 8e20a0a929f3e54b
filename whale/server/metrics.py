"""Prometheus metrics (prometheus-client, one registry per server): requests by route and status; per generation,
time to first token, the gap between tokens and the decode rate, each recorded as its tokens arrive from the
engine, streaming or not; prompt, cached and generated tokens; and, read from the engine when /metrics is
scraped, queue depth, KV-cache usage and speculative decoding's drafts (verified, accepted); the complexity
route's choices and the time it took to make them. `recent` keeps the last finished generations for
`/metrics/recent` (the playground's dashboard)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from whale.engine.async_engine import StreamDelta
from whale.engine.llm_engine import SpeculationStats

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RECENT_REQUESTS = 50  # finished generations `/metrics/recent` keeps
ROUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)
RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
request_log = logging.getLogger("whale.requests")  # a line per generation (`whale serve --log-level info`)


@dataclass(frozen=True)
class EngineGauges:
    """A snapshot of the engine, read from the server's event loop (racy by a step at most)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_tokens_used: int = 0
    kv_bytes_written: int = 0
    speculation: SpeculationStats = field(default_factory=SpeculationStats)  # a copy, not the engine's own


class _ScrapeTimeGauges(Collector):
    """Gauges read when /metrics is scraped: the engine's state and the HTTP requests in flight."""

    def __init__(self, gauges: Callable[[], EngineGauges], in_flight: Callable[[], int]):
        self._gauges = gauges
        self._in_flight = in_flight

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauges = self._gauges()
        usage = gauges.kv_blocks_used / gauges.kv_blocks_total if gauges.kv_blocks_total else 0.0
        for name, help_text, value in (
                ("whale_requests_in_flight", "HTTP generation requests being served now.", self._in_flight()),
                ("whale_engine_running_requests", "Requests the engine is running.", gauges.running),
                ("whale_engine_queue_depth", "Requests waiting for the engine.", gauges.waiting),
                ("whale_kv_cache_blocks_used", "KV-cache blocks held by requests.", gauges.kv_blocks_used),
                ("whale_kv_cache_blocks_total", "KV-cache blocks in all.", gauges.kv_blocks_total),
                ("whale_kv_cache_usage_ratio", "Share of KV-cache blocks in use.", usage),
                ("whale_kv_cache_bytes_written", "KV-cache storage written at least once, in bytes: on CPU the "
                 "cache is resident memory only where written.", gauges.kv_bytes_written)):
            yield GaugeMetricFamily(name, help_text, value=value)
        spec = gauges.speculation
        for name, help_text, value in (
                ("whale_spec_decode_draft_tokens", "Draft tokens verified (speculative decoding).", spec.drafted),
                ("whale_spec_decode_accepted_tokens", "Draft tokens accepted.", spec.accepted),
                ("whale_spec_decode_verifications", "Request-steps that verified drafts; each also yields one "
                                                    "token of its own.", spec.verifications)):
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("whale_spec_decode_acceptance_ratio", "Share of draft tokens accepted.",
                                value=spec.acceptance_rate)
        yield GaugeMetricFamily("whale_spec_decode_mean_accepted_length",
                                "Tokens per verifying step: accepted drafts + 1.", value=spec.mean_accepted_length)


@dataclass(frozen=True)
class FinishedRequest:
    """One finished generation, as `/metrics/recent` lists it (no prompt or output text)."""

    id: str
    route: str
    finished_at: float  # Unix time
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    first_token_ms: float
    total_ms: float
    tokens_per_s: float | None
    finish_reason: str  # "client left" where it ended with its client


class Metrics:
    """The metrics of one server. `in_flight` is kept by the request accounting (asgi.RequestAccounting)."""

    def __init__(self, gauges: Callable[[], EngineGauges]):
        self.registry = registry = CollectorRegistry()
        self.in_flight = 0
        self.requests = Counter("whale_requests", "HTTP requests served, by route and status code.",
                                ["route", "status"], registry=registry)
        self.ttft = Histogram("whale_time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token = Histogram("whale_inter_token_latency_seconds",
                                     "Time between consecutive tokens of a request, as they left the engine.",
                                     buckets=INTER_TOKEN_BUCKETS, registry=registry)
        self.latency = Histogram("whale_request_latency_seconds", "From request arrival to its last token.",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_rate = Histogram("whale_decode_tokens_per_second",
                                     "Per-request decode rate, first token to last.", buckets=RATE_BUCKETS,
                                     registry=registry)
        self.prompt_tokens = Counter("whale_prompt_tokens", "Prompt tokens of started requests.",
                                     registry=registry)
        self.cached_prompt_tokens = Counter("whale_prompt_cache_hit_tokens",
                                            "Prompt tokens served from the prefix cache.", registry=registry)
        self.generation_tokens = Counter("whale_generation_tokens", "Tokens generated.", registry=registry)
        self.route_decisions = Counter("whale_route_decisions", "Requests the complexity route decided, by mode, "
                                       "band and reason (score, sticky, request, key).", ["mode", "band", "reason"],
                                       registry=registry)
        self.route_seconds = Histogram("whale_route_decision_seconds", "Time the complexity route took to decide "
                                       "a request (scoring included).", buckets=ROUTE_BUCKETS, registry=registry)
        registry.register(_ScrapeTimeGauges(gauges, lambda: self.in_flight))
        self.recent: deque[FinishedRequest] = deque(maxlen=RECENT_REQUESTS)  # newest last

    def record_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def timer(self, arrival: float, request_id: str = "", route: str = "") -> GenerationTimer:
        return GenerationTimer(self, arrival, request_id, route)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class GenerationTimer:
    """One generation's timings, fed every delta as it arrives from the engine (time.monotonic clock);
    `finish` records the whole-request figures once, however the request ended, and logs the request's line
    (logger `whale.requests`, INFO)."""

    def __init__(self, metrics: Metrics, arrival: float, request_id: str = "", route: str = ""):
        self._metrics = metrics
        self._arrival = arrival
        self._request_id, self._route = request_id, route
        self._first: float | None = None
        self._last = arrival
        self._tokens = 0
        self._prompt = self._cached = 0
        self._finish_reason: str | None = None
        self._finished = False

    def saw(self, delta: StreamDelta) -> None:
        if delta.finish_reason is not None:
            self._finish_reason = delta.finish_reason
        count = len(delta.token_ids)
        if not count:
            return
        now, metrics = time.monotonic(), self._metrics
        if self._first is None:
            self._first = now
            metrics.ttft.observe(now - self._arrival)
            metrics.prompt_tokens.inc(delta.prompt_tokens)
            metrics.cached_prompt_tokens.inc(delta.cached_tokens)
            self._prompt, self._cached = delta.prompt_tokens, delta.cached_tokens
        else:  # tokens that arrive together (a stop string held back) share the gap
            for _ in range(count):
                metrics.inter_token.observe((now - self._last) / count)
        metrics.generation_tokens.inc(count)
        self._tokens += count
        self._last = now

    def finish(self) -> None:
        if self._finished or self._first is None:
            return
        self._finished = True
        self._metrics.latency.observe(self._last - self._arrival)
        rate = None
        if self._tokens > 1 and self._last > self._first:
            rate = (self._tokens - 1) / (self._last - self._first)
            self._metrics.decode_rate.observe(rate)
        self._metrics.recent.append(FinishedRequest(
            self._request_id, self._route, time.time(), self._prompt, self._cached, self._tokens,
            round((self._first - self._arrival) * 1e3, 1), round((self._last - self._arrival) * 1e3, 1),
            None if rate is None else round(rate, 2), self._finish_reason or "client left"))
        request_log.info("%s %s: %d prompt tokens (%d cached), %d generated, first token %.0f ms, %s, %s",
                         self._request_id, self._route, self._prompt, self._cached, self._tokens,
                         (self._first - self._arrival) * 1e3, "-" if rate is None else f"{rate:.1f} tok/s",
                         self._finish_reason or "client left")


def engine_gauges(async_engine: object) -> EngineGauges:
    """Read a whale AsyncEngine's scheduler and block manager; any other engine (a test double) reports zeros."""
    engine = getattr(async_engine, "engine", None)
    scheduler = getattr(engine, "scheduler", None)
    if scheduler is None:  # an engine elsewhere (whale.upstream) knows its requests in flight only
        return EngineGauges(running=getattr(async_engine, "num_unfinished", 0))
    cache, speculation = engine.cache, engine.speculation
    blocks = cache.blocks
    return EngineGauges(running=len(scheduler.running), waiting=len(scheduler.waiting),
                        kv_blocks_used=blocks.num_blocks - blocks.num_free_blocks, kv_blocks_total=blocks.num_blocks,
                        kv_tokens_used=(blocks.num_blocks - blocks.num_free_blocks) * cache.block_size,
                        kv_bytes_written=cache.bytes_written(),
                        speculation=replace(speculation))
