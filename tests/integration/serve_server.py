"""Start and stop `dynasorctl serve` on the real engine (vLLM CPU build, SmolLM2-135M).

Run from the project's own `.venv`, as an operator would: `serve` re-executes itself in
`.venv-engine` (or `$DYNASOR_ENGINE_PYTHON`). Also runnable by hand:
`python tests/integration/serve_server.py [PORT]` serves until Ctrl-C.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

try:  # a package module if tests/integration ever gets an __init__.py
    from .engine import ENV
    from .launch import LOGS, MODEL, MODEL_NAME, ROOT, free_port, launched, serve_by_hand
except ImportError:
    from engine import ENV
    from launch import LOGS, MODEL, MODEL_NAME, ROOT, free_port, launched, serve_by_hand

DYNASORCTL = ROOT / ".venv" / "bin" / "dynasorctl"
# vLLM's options, as the vLLM server tests use them (ENGINE.md); passed through by serve.
ENGINE_OPTIONS = ["--max-model-len", "2048", "--enable-prefix-caching", "--dtype", "bfloat16",
                  "--enforce-eager", "--served-model-name", MODEL_NAME]


def serve_command(port: int, db: str, *options: str, engine: tuple[str, ...] = ()) -> list[str]:
    return [str(DYNASORCTL), "serve", "--model", str(MODEL), "--port", str(port), "--db", db,
            *options, "--", *ENGINE_OPTIONS, *engine]


@contextmanager
def start_serve(port: int | None = None, db: str | None = None, options: tuple[str, ...] = (),
                env: dict[str, str] = ENV, timeout: float = 300,
                engine: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base_url, process) once GET /health answers (the engine is up by then)."""
    if not (MODEL / ".converted").exists():
        raise RuntimeError(f"{MODEL}/.converted is missing: run `make engine` first.")
    port = port or free_port()
    db = db or f"sqlite:///{LOGS / f'serve-{port}.db'}"
    url = f"http://127.0.0.1:{port}"
    with launched("dynasorctl serve", serve_command(port, db, *options, engine=engine), env, f"{url}/health",
                  LOGS / f"serve-{port}.log", timeout) as proc:
        yield url, proc


if __name__ == "__main__":
    LOGS.mkdir(parents=True, exist_ok=True)
    serve_by_hand(lambda port: start_serve(port), sys.argv, "dynasorctl serve")
