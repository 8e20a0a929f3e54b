"""A client that goes away aborts its request and frees its KV blocks within a step, streaming or not, on a fresh
connection or a reused keep-alive one, running or still queued. Detection reads the ASGI receive channel
(whale/server/asgi.py), so these tests hold on whatever fastapi / starlette / uvicorn is installed:
`make test-newest` runs this file against the newest releases."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_harness import serving

from whale.server.metrics import engine_gauges

STORY = [{"role": "user", "content": "Write a very long story about a whale who learns to sing."}]
LONG = {"model": "deepseek-chat", "messages": STORY, "max_tokens": 2000, "temperature": 0}
COUNTING = {"model": "deepseek-chat", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9,", "max_tokens": 2000, "temperature": 0,
            "stream": True}  # counting rarely ends early: holds the engine's one seat until closed
# A decode step of the default model at this batch takes ~10 ms, so the abort lands in well under a second (seen:
# 10-50 ms); the bound leaves room for a loaded machine and stays far below the ~15 s (2,000 tokens) the request
# would run if nobody aborted it.
ABORT_WITHIN_S = 3.0


@pytest.fixture(scope="module")
def server(default_llm):
    with serving(default_llm.loaded, engine_options={"num_kv_blocks": 256, "max_num_seqs": 1},
                 max_waiting=4) as served:
        yield served


def _idle(state) -> bool:
    return state.engine.num_unfinished == 0 and not state.engine.engine.has_unfinished()


def _wait(condition, timeout: float) -> float | None:
    """Seconds until `condition()` held, or None if it did not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.005)
    return None


def _assert_aborted_and_freed(state, after: str) -> None:
    took = _wait(lambda: _idle(state), ABORT_WITHIN_S)
    assert took is not None, f"the request still ran {ABORT_WITHIN_S} s after the client {after}"
    gauges = engine_gauges(state.engine)
    assert gauges.kv_blocks_used == 0 and gauges.running == 0 and gauges.waiting == 0, gauges


def _running(state) -> bool:
    return state.engine.engine.has_unfinished()


def test_a_streaming_client_that_closes_aborts(server):
    state, url = server
    with httpx.stream("POST", f"{url}/chat/completions", json={**LONG, "stream": True}, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert _running(state)
    _assert_aborted_and_freed(state, "closed its stream")


def test_a_non_streaming_client_that_times_out_aborts(server):
    state, url = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/chat/completions", json=LONG, timeout=httpx.Timeout(10, read=1.0))
    _assert_aborted_and_freed(state, "timed out")
    with pytest.raises(httpx.ReadTimeout):  # the same on the FIM / completions route
        httpx.post(f"{url}/completions", json={"model": "deepseek-chat", "prompt": "Once upon a time",
                                               "max_tokens": 2000, "temperature": 0},
                   timeout=httpx.Timeout(10, read=1.0))
    _assert_aborted_and_freed(state, "timed out")


def test_a_client_on_a_reused_keepalive_connection_aborts(server):
    state, url = server
    with httpx.Client(timeout=httpx.Timeout(10, read=1.0)) as client:
        first = client.post(f"{url}/chat/completions", json={**LONG, "max_tokens": 2})
        assert first.status_code == 200 and first.headers.get("connection", "keep-alive") == "keep-alive"
        with pytest.raises(httpx.ReadTimeout):
            client.post(f"{url}/chat/completions", json=LONG)  # goes out on the kept-alive connection
    _assert_aborted_and_freed(state, "timed out on a reused connection")


def test_the_anthropic_route_aborts_too(server):
    state, url = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/anthropic/v1/messages", json={**LONG, "max_tokens": 4000},
                   timeout=httpx.Timeout(10, read=1.0))
    _assert_aborted_and_freed(state, "timed out")


def test_a_queued_client_that_leaves_is_dropped_and_the_queue_moves_on(server):
    """One seat: a request that waits behind a running one and whose client leaves never runs."""
    state, url = server
    with httpx.stream("POST", f"{url}/completions", json=COUNTING, timeout=30) as holder:
        holding = holder.iter_lines()  # kept: a dropped line iterator closes the response
        next(holding)
        # a queued non-streaming request gets blank-line keep-alives (so a read timeout never fires): its
        # client hangs up after the first one
        with httpx.stream("POST", f"{url}/chat/completions", json=LONG, timeout=30) as queued:
            body = queued.iter_raw()  # kept: a dropped iterator closes the response
            assert next(body).strip() == b""
            assert state.engine.num_unfinished == 2
        assert _wait(lambda: state.engine.num_unfinished == 1, ABORT_WITHIN_S) is not None
        replies: dict = {}
        waiter = threading.Thread(target=lambda: replies.update(r=httpx.post(
            f"{url}/chat/completions", json={**LONG, "max_tokens": 3}, timeout=30)))
        waiter.start()
        assert _wait(lambda: state.engine.num_unfinished == 2, 5) is not None
    waiter.join(timeout=30)  # the holder left, so the queued short request runs
    assert replies["r"].status_code == 200 and replies["r"].json()["usage"]["completion_tokens"] == 3
    _assert_aborted_and_freed(state, "left")
