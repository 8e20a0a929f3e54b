"""`whale serve` as a user starts it (what `make serve` runs): a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "whale serve did not come up within 60 s"
        time.sleep(0.2)


def test_whale_serve_starts_uvicorn_with_its_options():
    port = _free_port()
    command = [sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--host", "127.0.0.1",
               "--port", str(port), "--api-key", "sk-test", "--served-model-name", "tiny-chat",
               "--max-model-len", "512", "--threads", "1", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, url)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-test"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny-chat", "deepseek-v4-flash", "deepseek-v4-pro",
                                                     "deepseek-flash", "deepseek-chat", "deepseek-reasoner",
                                                     "deepseek-auto", "auto"]
        routed = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                            json={"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert routed.headers["x-whale-route-mode"] == "non-thinking"  # the default model has no thinking mode
        long = {"model": "tiny-chat", "messages": [{"role": "user", "content": "whale " * 600}]}
        refused = httpx.post(f"{url}/v1/chat/completions", json=long, headers={"Authorization": "Bearer sk-test"})
        assert refused.status_code == 400 and "maximum context length is 512 tokens" in refused.text
    finally:
        process.terminate()
        process.wait(timeout=20)
    banner = process.stdout.read().decode().splitlines()[0]
    assert banner.startswith("whale serve: tiny-chat (")
    # the default GGUF's kernels: its blocks (AVX2), hybrid (bf16 hardware), int4 (hybrid's twins not fitting)
    assert re.search(r"context 512, (blocks|hybrid|int4) kernels, 1 thread, route: deepseek-auto\)", banner), banner


def test_a_bad_route_config_is_reported_before_the_model_loads(tmp_path):
    config = tmp_path / "route.toml"
    config.write_text("[route]\nsticky_margin = 3\n")
    done = subprocess.run([sys.executable, "-m", "whale.cli", "serve", "--route-config", str(config),
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "whale serve: error: route sticky_margin 3 must be in [0, 1]\n"
    done = subprocess.run([sys.executable, "-m", "whale.cli", "serve", "--route", "off", "--route-config",
                           str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--route off turns off" in done.stderr


def test_a_busy_port_is_reported_at_once_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(f"whale serve: error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert done.stderr.count("\n") == 1
    assert time.monotonic() - start < 15  # before the model loads (which takes longer than starting Python)


@contextlib.contextmanager
def _serving_a_long_stream(shutdown_timeout: float, **body):
    """A default-model server with one long chat stream open: yields the process and the stream's lines (20 of
    them read already; the rest an iterator) and kills the server if a test leaves it running."""
    port = _free_port()
    command = [sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--port", str(port),
               "--shutdown-timeout", str(shutdown_timeout), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, url)
        body = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 4096, "stream": True, **body}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()
            yield process, [line for line in itertools.islice(lines, 20) if line.startswith("data: ")], lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_second_sigterm_ends_the_streams_and_the_server_at_once():
    """A supervisor's SIGTERM, then another: the drain of 60 s is cut short, the stream ends, the server exits."""
    with _serving_a_long_stream(60) as (process, events, lines):
        process.send_signal(signal.SIGTERM)
        time.sleep(1)  # two signals at once reach a process as one
        process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        process.wait(timeout=20)
        assert time.monotonic() - stopped < 10


def test_a_shutdown_that_hangs_ends_with_every_threads_stack():
    """The watchdog of a server told to stop: here the main thread hangs right after the signal (no real part
    hangs on demand; the server state is a double with the one method the signal handler calls)."""
    script = textwrap.dedent("""
        import signal, threading, uvicorn
        from whale.commands.serve import DrainingServer
        class State:
            def fail_all(self, message):
                pass
        server = DrainingServer(uvicorn.Config(app=None), State(), drain_s=0.1, deadline_s=1.0)
        server.handle_exit(signal.SIGTERM, None)
        threading.Event().wait()
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and time.monotonic() - started < 20
    assert "the shutdown is not done 1 s after the signal; exiting" in done.stderr
    assert "(most recent call first)" in done.stderr and 'File "<string>", line 9' in done.stderr  # the wait


def test_ctrl_c_drains_then_ends_a_live_stream_with_its_final_chunk():
    with _serving_a_long_stream(1, stream_options={"include_usage": True}) as (process, events, lines):
        process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event[6:]) for event in events[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "insufficient_system_resource" and chunks[-1]["usage"]["completion_tokens"] < 4096
        # 130 (interrupted) when uvicorn re-raises the captured SIGINT after its shutdown, 0 when it does not
        assert process.wait(timeout=20) in (0, 130)
        assert time.monotonic() - stopped < 10  # the 1 s drain, then the stream ends and the server exits
    output = process.stdout.read().decode()
    assert "shutting down; requests in flight get 1 s to finish" in output and "Traceback" not in output
