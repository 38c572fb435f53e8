"""The real vLLM server, started once per session for the tests in this folder."""

from pathlib import Path

import pytest

try:  # imported as a package module if tests/ ever gets __init__.py files
    from .engine import start_vllm_server
    from .sglang_server import start_sglang_server
except ImportError:  # pytest's default rootdir-less import puts this folder on sys.path
    from engine import start_vllm_server
    from sglang_server import start_sglang_server

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # Everything here needs the engine, so `-m "not engine"` deselects it all.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.engine)


@pytest.fixture(scope="session")
def vllm_url():
    """Base URL (no /v1) of the server. A missing engine fails loudly: run `make engine`."""
    with start_vllm_server() as (url, _proc):
        yield url


@pytest.fixture(scope="session")
def sglang_url():
    """Base URL (no /v1) of the SGLang server. Missing, it fails loudly: run `make engine`."""
    with start_sglang_server() as (url, _proc):
        yield url
