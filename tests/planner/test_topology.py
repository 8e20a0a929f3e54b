"""`whale plan --emit DIR`: the deployment of a plan as a script and a docker-compose file. The script is run here
end to end (`launch.sh all` with whale replicas of the default model, the real SGLang gateway, whale's front);
the compose file (no Docker daemon here) is checked for what it says: each replica's GPUs, and commands that
the gateway's and whale's own argument parsers accept."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from sglang_router.launch_router import parse_router_args

from whale.cli import build_parser

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from test_server_cli import _wait_ready  # noqa: E402


def _emit(tmp_path: Path, *args: str) -> Path:
    command = [sys.executable, "-m", "whale.cli", "plan", *args, "--emit", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True)
    return tmp_path


def _free_port_pair() -> int:
    """A port p with p + 1 free too (replica I listens on REPLICA_PORT + I)."""
    import socket

    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port


def test_the_emitted_script_runs_the_whole_topology(tmp_path, default_llm):
    directory = _emit(tmp_path, "r1-distill-qwen-1.5b", "--gpu", "RTX4090", "--replica-engine", "whale",
                      "--replicas", "2")
    assert not (directory / "docker-compose.yml").exists()  # whale replicas: the script only
    replica_port, gateway_port, front_port = _free_port_pair(), _free_port_pair(), _free_port_pair()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "WEIGHTS": "default",
           "MODEL": "default", "REPLICA_PORT": str(replica_port), "GATEWAY_PORT": str(gateway_port),
           "FRONT_PORT": str(front_port)}
    log = tmp_path / "launch.log"
    with log.open("wb") as output:
        process = subprocess.Popen([str(directory / "launch.sh"), "all"], env=env, start_new_session=True,
                                   stdout=output, stderr=subprocess.STDOUT)
    front = f"http://127.0.0.1:{front_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                workers = httpx.get(f"http://127.0.0.1:{gateway_port}/workers", timeout=2).json()["workers"]
                if len(workers) == 2 and httpx.get(f"{front}/health", timeout=2).status_code == 200:
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the topology did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            reply = client.chat.completions.create(model="deepseek-chat", max_tokens=4,
                                                   messages=[{"role": "user", "content": "Hi"}])
            assert reply.choices[0].message.content
        served = 0  # the gateway (cache-aware: the same prompt goes where it is cached) sent them to the replicas
        for port in (replica_port, replica_port + 1):
            for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
                if line.startswith('whale_requests_total{route="/generate",status="200"}'):
                    served += int(float(line.rsplit(" ", 1)[1]))
        assert served == 2
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        # four servers shutting down at once on two cores; a whale role whose shutdown hangs is ended by its
        # watchdog 40 s after the signal (seen once: a replica still sleeping after 60 s, before the watchdog)
        deadline = time.monotonic() + 60
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not _group_alive(process.pid), (f"roles outlived `launch.sh all`: {_group_members(process.pid)}; "
                                           f"their output:\n{log.read_text(errors='replace')[-6000:]}")
    output = log.read_text(errors="replace")
    if "the shutdown is not done" in output:  # a role's watchdog ended it (whale serve's last resort): say where
        warnings.warn(f"a role's shutdown hung and its watchdog ended it:\n{output[-6000:]}", stacklevel=1)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _group_members(group: int) -> list[str]:
    """State and command line of each process left in the group (Z: exited, not yet reaped), and where in the
    kernel each of its threads waits."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            waits = sorted(f"{(task / 'comm').read_text().strip()}:{(task / 'wchan').read_text()}"
                           for task in (stat.parent / "task").iterdir())
        except OSError:
            continue
        if int(fields[2]) == group:
            members.append(f"{stat.parent.name} {fields[0]} {command.strip()} (threads: {', '.join(waits)})")
    return members


def _front_args(command: list[str]) -> list[str]:
    return ["serve", *[a.replace("${MODEL:-deepseek-ai/DeepSeek-V3}", "deepseek-ai/DeepSeek-V3") for a in command[1:]]]


def test_compose_for_a_host_of_one_gpu_replicas(tmp_path):
    directory = _emit(tmp_path, "deepseek-v2-lite", "--gpu", "H100", "--replicas", "4")
    compose = yaml.safe_load((directory / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = [services[f"replica-{i}"] for i in range(4)]
    devices = [r["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for r in replicas]
    assert devices == [["0"], ["1"], ["2"], ["3"]]
    assert all(r["command"][:3] == ["python3", "-m", "sglang.launch_server"] for r in replicas)
    gateway = shlex.split(services["gateway"]["command"][2].split("&& exec ", 1)[1])
    router = parse_router_args(gateway[3:])
    assert router.worker_urls == [f"http://replica-{i}:{30001 + i}" for i in range(4)]
    assert router.health_check_interval_secs == 10  # a dead replica leaves the rotation in ~30 s, not ~3 min
    front = services["front"]["command"]
    args = build_parser(["serve"]).parse_args(["serve", *[a.split(":-", 1)[-1].rstrip("}") if a.startswith("${")
                                                          else a for a in front[1:]]])
    assert args.upstream == ["http://gateway:30000"] and args.model == "deepseek-ai/DeepSeek-V2-Lite-Chat"


def test_a_replica_over_several_nodes(tmp_path):
    """DeepSeek-V3 in BF16 on H100s takes 3 nodes a replica: the script runs each node's rank, with the replica's
    first host as the rendezvous; no compose file (a replica spans hosts)."""
    directory = _emit(tmp_path, "deepseek-v3", "--gpu", "H100", "--dtype", "bf16")
    script = (directory / "launch.sh").read_text()
    assert '--nnodes 3 --node-rank "$RANK" --dist-init-addr ${REPLICA_HEAD}:20000' in script
    assert "RANK=${RANK:-0}" in script and "WEIGHTS=${WEIGHTS:-./DeepSeek-V3-bf16}" in script
    assert not (directory / "docker-compose.yml").exists()
    subprocess.run(["bash", "-n", str(directory / "launch.sh")], check=True)


def test_vllm_replicas_have_the_front_over_them_in_order(tmp_path, default_llm):
    """The gateway routes SGLang's /generate only: over vLLM replicas the emitted front speaks vLLM's protocol to
    each replica in turn. Its `front` role is run here over two whale replicas (whale's /v1/completions takes
    vLLM's extras): it answers through the first, and through the second once the first is gone."""
    directory = _emit(tmp_path, "deepseek-v3", "--gpu", "H200", "--dtype", "fp8", "--replica-engine", "vllm")
    script = (directory / "launch.sh").read_text()
    assert 'exec vllm serve "$WEIGHTS" --trust-remote-code --tensor-parallel-size 8' in script
    assert "gateway" not in script.split("set -euo pipefail")[1] and not (directory / "docker-compose.yml").exists()
    replica_port, front_port = _free_port_pair(), _free_port_pair()
    replicas = [subprocess.Popen([sys.executable, "-m", "whale.cli", "serve", "--model", "default", "--host",
                                  "127.0.0.1", "--port", str(replica_port + i), "--threads", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MODEL": "default",
           "REPLICA_PORT": str(replica_port), "FRONT_PORT": str(front_port)}
    front = subprocess.Popen([str(directory / "launch.sh"), "front"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for i, replica in enumerate(replicas):
            _wait_ready(replica, f"http://127.0.0.1:{replica_port + i}")
        _wait_ready(front, f"http://127.0.0.1:{front_port}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{front_port}/v1", api_key="unused", max_retries=0)
        ask = {"model": "deepseek-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        assert client.chat.completions.create(**ask).choices[0].message.content
        replicas[0].kill()
        replicas[0].wait(timeout=20)
        assert client.chat.completions.create(**ask).choices[0].message.content
    finally:
        for process in [*replicas, front]:
            process.kill()
            process.wait(timeout=20)


def test_a_replica_engine_the_plan_has_no_command_for(tmp_path):
    command = [sys.executable, "-m", "whale.cli", "plan", "deepseek-v3", "--gpu", "H200", "--replica-engine",
               "whale", "--emit", str(tmp_path)]  # 8 GPUs: whale serves one
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and "no whale command" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("replicas", [0])
def test_replicas_must_be_positive(tmp_path, replicas):
    command = [sys.executable, "-m", "whale.cli", "plan", "deepseek-v2-lite", "--gpu", "H100", "--replicas",
               str(replicas), "--emit", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and "--replicas must be at least 1" in result.stderr
