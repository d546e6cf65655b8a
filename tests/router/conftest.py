from __future__ import annotations

import importlib.util

import pytest

# redis-py is optional: without it these tests are not collected.
if importlib.util.find_spec("redis") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def redis_server():
    from pdray.router.redis_server import RedisServer, find_redis_server

    try:
        find_redis_server()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with RedisServer() as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def app_name(request) -> str:
    """A Redis key namespace of this test alone."""
    return "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)
