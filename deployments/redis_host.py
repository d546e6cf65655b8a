"""A one-replica deployment that runs the app's private redis-server (when no redis_url is set).

It lives as long as the application: Ray Serve stops it with the app, and its __del__ stops the
server; however its actor ends (serve shutdown, `serve run` stopped by any signal, the process
killed) the server dies with it (RedisServer's parent-death signal). A replacement replica
starts its server on the same port (chosen when the app is built), so the URL that the other
replicas hold stays valid; their heartbeats re-create the records. Other replicas ask it for the
URL (`url()`); multi-node setups should set `redis_url` to a shared Redis instead, since this one
listens on 127.0.0.1 of its node.
"""

from __future__ import annotations

from pdray.router.redis_server import RedisServer

DEPLOYMENT_NAME = "RedisHost"


class RedisHost:
    def __init__(self, port: int | None = None) -> None:
        self.server = RedisServer(port=port)
        self._url = self.server.start()

    def url(self) -> str:
        return self._url

    def check_health(self) -> None:
        if not self.server.running:
            raise RuntimeError("the private redis-server has stopped")

    def __del__(self) -> None:
        self.server.stop()


def resolve_redis_url(redis_url: str | None) -> str:
    """The configured URL, or the private server's (blocking: call from a non-event-loop thread)."""
    if redis_url:
        return redis_url
    from ray import serve

    app_name = serve.get_replica_context().app_name
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name).url.remote().result()
