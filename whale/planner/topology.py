"""The whole deployment of a plan (`whale plan ... --emit DIR`): N engine replicas laid out as the plan says,
SGLang's model gateway in front of them, and whale's front (`whale serve --upstream`) in front of the gateway;
written as a shell script (`launch.sh ROLE`, one role per host, or `all` on one box) and, where a replica fits
one host, a docker-compose file for a host. docs/upstream.md has the Kubernetes variant."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from whale.errors import InvalidRequestError
from whale.planner.launch import HEAD, weight_source
from whale.planner.plan import Plan

REPLICA_ENGINES = ("sglang", "whale", "vllm")  # vllm: no gateway (it routes SGLang's /generate only)
GATEWAY_PORT, REPLICA_PORT, FRONT_PORT = 30000, 30001, 8000
# a 671B checkpoint takes many minutes to load: the gateway waits this long for its workers to come up
WORKER_STARTUP_S = 3600
# the gateway's health checks (default: every 60 s, 3 failures: ~3 minutes to mark a dead replica) every 10 s,
# so a dead replica leaves the rotation in ~30 s (its circuit breaker and retries cover the time between)
HEALTH_FLAGS = "--health-check-interval-secs 10 --health-failure-threshold 3"
SGLANG_IMAGE = "lmsysorg/sglang:latest"
GATEWAY_PACKAGE = "sglang-router==0.3.2"


@dataclass(frozen=True)
class Topology:
    """`replica_args`: the engine command of one replica, its weights as "$WEIGHTS" (without host and port);
    `front_model`: what the front reads the tokenizer and chat template from."""

    label: str
    engine: str
    replica_args: list[str]
    weights: str
    front_model: str
    replicas: int
    replica_gpus: int
    replica_nodes: int
    gpus_per_node: int
    policy: str = "cache_aware"

    @property
    def gateway(self) -> bool:
        """Whether SGLang's gateway fronts the replicas (it routes SGLang's /generate, which vLLM lacks: over vLLM
        replicas the front takes them in order, as fallbacks)."""
        return self.engine != "vllm"

    @property
    def replicas_per_host(self) -> int:
        return self.gpus_per_node // self.replica_gpus if self.replica_nodes == 1 else 0


def topology_for(plan: Plan, replicas: int, engine: str = "sglang") -> Topology:
    if replicas < 1:
        raise InvalidRequestError("--replicas must be at least 1")
    if engine not in plan.launch or engine not in REPLICA_ENGINES:
        possible = [e for e in REPLICA_ENGINES if e in plan.launch]
        raise InvalidRequestError(f"this plan has no {engine} command; replicas can run {', '.join(possible)}")
    if plan.chosen is None:
        raise InvalidRequestError("no layout holds this model: there is nothing to launch")
    spec, layout = plan.request.spec, plan.chosen.layout
    weights, _ = weight_source(spec, plan.request.dtype)
    command = plan.launch[engine].splitlines()[-1]  # multi-node commands start with a comment line
    flag = {"sglang": "--model-path", "whale": "--model", "vllm": "vllm serve"}[engine]
    args = shlex.split(command.replace(f"{flag} {weights}", f"{flag} WEIGHTS_PLACEHOLDER"))
    args = ['"$WEIGHTS"' if a == "WEIGHTS_PLACEHOLDER" else a for a in args]
    args = [f"${{REPLICA_HEAD}}:{a.split(':', 1)[1]}" if a.startswith(f"{HEAD}:") else a for a in args]
    args = ['"$RANK"' if a == "$RANK" else a for a in args]
    return Topology(spec.label, engine, args, weights, spec.hf_id or weights, replicas, layout.gpus, layout.nodes,
                    layout.gpus_per_node)


def launch_script(t: Topology) -> str:
    hosts = " ".join(["127.0.0.1"] * t.replicas)
    multi = t.replica_nodes > 1
    replica_note = (f"on each of replica I's {t.replica_nodes} nodes, RANK=0..{t.replica_nodes - 1} "
                    "(rank 0 on REPLICA_HOSTS[I])" if multi else "on replica I's host, REPLICA_HOSTS[I]")
    if t.engine == "vllm" and multi:
        replica_note = "on the head node of replica I's Ray cluster (`ray start` on each of its nodes first)"
    over = ("SGLang's model gateway in front of them, whale's front (the DeepSeek API) in front of the gateway"
            if t.gateway else "whale's front (the DeepSeek API) over them, in order (fallbacks: for throughput,\n"
            "# give one replica the plan's data parallelism)")
    roles = ["replica) replica \"${2:?replica index}\" ;;", *(["gateway) gateway ;;"] if t.gateway else []),
             "front) front ;;"]
    started = ["for i in \"${!REPLICA_HOSTS[@]}\"; do replica \"$i\" & done", *(["gateway &"] if t.gateway else []),
               "front &"]
    if t.gateway:
        gateway = f"""gateway() {{
    local urls=()
    for i in "${{!REPLICA_HOSTS[@]}}"; do urls+=("http://${{REPLICA_HOSTS[$i]}}:$((REPLICA_PORT + i))"); done
    exec python3 -m sglang_router.launch_router --worker-urls "${{urls[@]}}" --host 0.0.0.0 --port "$GATEWAY_PORT" \\
        --policy {t.policy} --worker-startup-timeout-secs {WORKER_STARTUP_S} {HEALTH_FLAGS}
}}

"""
        front = """front() {
    exec whale serve --model "$MODEL" --upstream "http://$GATEWAY_HOST:$GATEWAY_PORT" --host 0.0.0.0 \\
        --port "$FRONT_PORT"
}"""
    else:
        gateway = ""
        front = """front() {
    local upstreams=()
    for i in "${!REPLICA_HOSTS[@]}"; do
        upstreams+=(--upstream "http://${REPLICA_HOSTS[$i]}:$((REPLICA_PORT + i))")
    done
    exec whale serve --model "$MODEL" --upstream-protocol vllm "${upstreams[@]}" --host 0.0.0.0 \\
        --port "$FRONT_PORT"
}"""
    gateway_vars = (f"GATEWAY_HOST=${{GATEWAY_HOST:-127.0.0.1}}\nGATEWAY_PORT=${{GATEWAY_PORT:-{GATEWAY_PORT}}}\n"
                    if t.gateway else "")
    gateway_line = f"#   ./launch.sh gateway     on GATEWAY_HOST ({GATEWAY_PACKAGE} installed)\n" if t.gateway else ""
    usage = "replica I | gateway | front | all" if t.gateway else "replica I | front | all"
    role_lines = "\n".join(f"    {line}" for line in roles)
    start_lines = "\n".join(f"        {line}" for line in started)
    return f"""#!/usr/bin/env bash
# {t.label}: {t.replicas} {t.engine} replica{"s" if t.replicas > 1 else ""} of {t.replica_gpus} GPU\
{"s" if t.replica_gpus > 1 else ""} ({t.replica_nodes} node{"s" if multi else ""} each),
# {over}. Written by `whale plan --emit`.
#
#   ./launch.sh replica I   {replica_note}
{gateway_line}#   ./launch.sh front       where clients connect (whale installed; reads no weights)
#   ./launch.sh all         every role on this host, stopped together (one box, or trying it out)
#
# Set the hosts and ports below, or in the environment.
set -euo pipefail
read -r -a REPLICA_HOSTS <<< "${{REPLICA_HOSTS:-{hosts}}}"
REPLICA_PORT=${{REPLICA_PORT:-{REPLICA_PORT}}}  # replica I listens on REPLICA_PORT + I
{gateway_vars}FRONT_PORT=${{FRONT_PORT:-{FRONT_PORT}}}
WEIGHTS=${{WEIGHTS:-{t.weights}}}  # what the replicas load
MODEL=${{MODEL:-{t.front_model}}}  # what the front reads its tokenizer and chat template from
{"RANK=${RANK:-0}" if multi else ""}

replica() {{
    local i=$1
    REPLICA_HEAD=${{REPLICA_HOSTS[$i]}}
    exec {" ".join(t.replica_args)} --host 0.0.0.0 --port $((REPLICA_PORT + i))
}}

{gateway}{front}

case "${{1:-}}" in
{role_lines}
    all)
        trap 'trap - EXIT INT TERM; kill 0' EXIT INT TERM  # once: the whole group goes with this script
{start_lines}
        wait ;;
    *) echo "usage: $0 {usage}" >&2; exit 2 ;;
esac
"""


def _yaml_list(items: list[str]) -> str:
    return "[" + ", ".join('"' + item.replace('\\', '\\\\').replace('"', '\\"') + '"' for item in items) + "]"


def compose_file(t: Topology) -> str | None:
    """One host's services: as many replicas as its GPUs hold, the gateway, the front. None when a replica
    spans several hosts (run launch.sh, or Kubernetes)."""
    if t.engine != "sglang" or t.replicas_per_host < 1:
        return None
    count = min(t.replicas, t.replicas_per_host)
    lines = [f"# {t.label}: {count} SGLang replica{'s' if count > 1 else ''} of {t.replica_gpus} GPUs on this host, "
             "SGLang's model gateway, whale's front on port 8000.",
             "# Written by `whale plan --emit`; WEIGHTS and MODEL as in launch.sh. `docker compose up`.",
             "services:"]
    urls = []
    for i in range(count):
        port = REPLICA_PORT + i
        gpus = [str(g) for g in range(i * t.replica_gpus, (i + 1) * t.replica_gpus)]
        args = [a.replace('"$WEIGHTS"', "${WEIGHTS:-" + t.weights + "}") for a in t.replica_args]
        urls.append(f"http://replica-{i}:{port}")
        lines += [f"  replica-{i}:", f"    image: {SGLANG_IMAGE}",
                  f"    command: {_yaml_list([*args, '--host', '0.0.0.0', '--port', str(port)])}",
                  "    ipc: host", "    shm_size: 32gb",
                  "    volumes: [\"${HF_HOME:-~/.cache/huggingface}:/root/.cache/huggingface\"]",
                  "    deploy:", "      resources:", "        reservations:", "          devices:",
                  f"            - {{driver: nvidia, device_ids: {_yaml_list(gpus)}, capabilities: [gpu]}}",
                  "    healthcheck:",
                  f"      test: [\"CMD\", \"curl\", \"-sf\", \"http://localhost:{port}/health\"]",
                  f"      interval: 30s\n      start_period: {WORKER_STARTUP_S}s"]
    gateway = ["sh", "-c", f"pip install --quiet {GATEWAY_PACKAGE} && exec python -m sglang_router.launch_router "
               f"--worker-urls {' '.join(urls)} --host 0.0.0.0 --port {GATEWAY_PORT} --policy {t.policy} "
               f"--worker-startup-timeout-secs {WORKER_STARTUP_S} {HEALTH_FLAGS}"]
    lines += ["  gateway:", "    image: python:3.11-slim", f"    command: {_yaml_list(gateway)}",
              "    depends_on:", *[f"      replica-{i}: {{condition: service_healthy}}" for i in range(count)]]
    front = ["serve", "--model", "${MODEL:-" + t.front_model + "}", "--upstream",
             f"http://gateway:{GATEWAY_PORT}", "--host", "0.0.0.0", "--port", str(FRONT_PORT)]
    lines += ["  front:", "    build: ${WHALE_SRC:-.}  # a whale checkout (its Dockerfile)",
              f"    command: {_yaml_list(front)}", f"    ports: [\"{FRONT_PORT}:{FRONT_PORT}\"]",
              "    volumes: [\"${HF_HOME:-~/.cache/huggingface}:/root/.cache/huggingface\"]",
              "    depends_on: [gateway]"]
    return "\n".join(lines) + "\n"


def write_topology(t: Topology, directory: Path) -> list[Path]:
    """launch.sh (executable) and, where a replica fits one host, docker-compose.yml; returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "launch.sh"
    script.write_text(launch_script(t))
    script.chmod(0o755)
    written = [script]
    compose = compose_file(t)
    if compose is not None:
        (directory / "docker-compose.yml").write_text(compose)
        written.append(directory / "docker-compose.yml")
    return written
