"""Start-up and throughput: `dynasorctl serve` against vLLM's own server, same engine options.

    flock /tmp/dynasor-engine.lock .venv/bin/python scripts/serve_bench.py [--rounds 3]

Starts each server in turn (never both: one engine at a time on this machine) on the
SmolLM2 checkpoint `make engine` converts, times its start-up (process start to its
first answer), then sends streamed chat requests that generate exactly `--tokens` tokens
each (`ignore_eos`), one at a time and `--concurrency` at once, and prints generated
tokens per second (median of the rounds) for each. `serve` runs with its default scheduler
(dynasor's) and capacity and probing off, so both servers do the same engine work and
the difference is what dynasor's pipeline and admission cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".cache" / "models" / "smollm2-135m"
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
       "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # as the integration tests run the engine
ENGINE = ["--max-model-len", "2048", "--enable-prefix-caching", "--dtype", "bfloat16",
          "--enforce-eager", "--served-model-name", "smollm2"]
PROMPT = [{"role": "user", "content": "Write a long story about a cat."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(port: int, db: str) -> dict[str, list[str]]:
    engine_python = os.environ.get("DYNASOR_ENGINE_PYTHON") or str(ROOT / ".venv-engine" / "bin" / "python")
    return {
        "vllm": [engine_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL),
                 "--host", "127.0.0.1", "--port", str(port), *ENGINE],
        "serve": [str(ROOT / ".venv" / "bin" / "dynasorctl"), "serve", "--model", str(MODEL),
                  "--port", str(port), "--db", db, "--probe-rate", "0", "--", *ENGINE],
    }


def start(cmd: list[str], url: str, log: Path) -> tuple[subprocess.Popen, float]:
    began = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if proc.poll() is not None:
            sys.exit(f"{cmd[0]} exited while starting; see {log}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the engine core and workers are in its group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


async def one_stream(client: httpx.AsyncClient, url: str, tokens: int) -> None:
    body = {"model": "smollm2", "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0.7, "stream": True}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for _ in resp.aiter_raw():
            pass


async def tokens_per_second(url: str, concurrency: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        began = time.monotonic()
        await asyncio.gather(*(one_stream(client, url, tokens) for _ in range(concurrency)))
        return concurrency * tokens / (time.monotonic() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--logs", type=Path, default=ROOT / ".cache" / "logs")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ("vllm", "serve"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = commands(port, f"sqlite:///{args.logs / 'serve-bench.db'}")[name]
        proc, ready = start(cmd, url, args.logs / f"serve-bench-{name}.log")
        try:
            asyncio.run(tokens_per_second(url, 1, 16))  # warm-up
            single = [asyncio.run(tokens_per_second(url, 1, args.tokens)) for _ in range(args.rounds)]
            many = [asyncio.run(tokens_per_second(url, args.concurrency, args.tokens))
                    for _ in range(args.rounds)]
        finally:
            stop(proc)
        rows.append((name, ready, statistics.median(single), statistics.median(many)))
        print(f"{name}: ready in {ready:.1f} s; 1 stream {statistics.median(single):.1f} tok/s "
              f"(rounds {', '.join(f'{v:.1f}' for v in single)}); {args.concurrency} streams "
              f"{statistics.median(many):.1f} tok/s (rounds {', '.join(f'{v:.1f}' for v in many)})",
              flush=True)
    print(f"\n| | start-up | 1 stream | {args.concurrency} streams |\n|---|---|---|---|")
    for name, ready, single, many in rows:
        label = "vLLM's server" if name == "vllm" else "dynasorctl serve"
        print(f"| {label} | {ready:.0f} s | {single:.1f} tok/s | {many:.1f} tok/s |")


if __name__ == "__main__":
    main()
