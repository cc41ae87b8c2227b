"""The HTTP side of the node: the FastAPI application and the uvicorn server that runs it in our loop.

`build_http_app` makes the application with the routes every node has (`/healthz`, `/metrics`); later
features add their routers to the returned app (REST, WebSocket agent API, toolbar files). `HttpServer`
binds the socket itself (so port 0 works and the chosen port is known) and serves the app inside the
node's event loop, leaving signal handling to the composition root.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator

import structlog
import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST

from softswitch.metrics import Metrics

log = structlog.get_logger(__name__)

#: Pending TCP connections in the kernel's accept queue (listen backlog).
LISTEN_BACKLOG = 512
#: Seconds open requests get to finish at shutdown before they are cancelled; bounded so SIGTERM ends
#: the node promptly even with a long-polling client attached.
GRACEFUL_SHUTDOWN_S = 3
#: Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_S = 5
#: How long `start()` waits for uvicorn to report that it serves.
STARTUP_TIMEOUT_S = 10.0


def build_http_app(*, version: str, metrics: Metrics, sip_port: Callable[[], int | None]) -> FastAPI:
    """The node's FastAPI application with `/healthz` and `/metrics` (CONTRACT.md "Ports and protocols").

    `sip_port` is asked on each health check, so the app can be built before the edge has bound.
    """
    app = FastAPI(title="softswitch", version=version)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, object]:
        """Liveness: the node runs and serves HTTP."""
        return {"status": "ok", "version": version, "sip_port": sip_port()}

    @app.get("/metrics", tags=["operations"])
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition format 0.0.4."""
        return Response(content=metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers (the node decides when to stop) that says when it serves."""

    def __init__(self, config: uvicorn.Config, on_serving: Callable[[], None]) -> None:
        super().__init__(config)
        self.serving = asyncio.Event()
        self._on_serving = on_serving

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            # No await between uvicorn's listen and here: at most one loop iteration has passed since the
            # socket listens, too few to read and answer a request.
            self._on_serving()
            self.serving.set()


class HttpServer:
    """Serves a FastAPI app on `host:port` (port 0 picks a free one) inside the running event loop."""

    def __init__(
        self, app: FastAPI, host: str, port: int, *, on_serving: Callable[[int], None] | None = None
    ) -> None:
        self.app = app
        self._on_serving = on_serving
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port actually bound (known after `start()`)."""
        if self._port is None:
            raise RuntimeError("HTTP server not started")
        return self._port

    async def start(self) -> None:
        """Bind and serve; return once uvicorn serves. Raises OSError if the address cannot be bound.

        The socket only listens once uvicorn serves it. `on_serving(port)` is called as soon as it does,
        before any request can have been answered (the node writes ports.json there); an exception from
        it aborts the start.
        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._requested_port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"cannot listen on {self._host}:{self._requested_port} (HTTP): {exc.strerror}"
            ) from None
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # our logging setup (softswitch.logging) renders uvicorn's records too
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            timeout_keep_alive=KEEP_ALIVE_S,
            backlog=LISTEN_BACKLOG,
            server_header=False,
        )
        server = _EmbeddedUvicorn(config, on_serving=self._serving)
        self._server = server
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http-server")
        self._task = task
        serving = asyncio.create_task(server.serving.wait())
        await asyncio.wait({task, serving}, timeout=STARTUP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            serving.cancel()
            if task.done():
                # serve() ended before it served (e.g. an application startup hook failed).
                error = task.exception() if not task.cancelled() else None
                self._task = None
                self._server = None
                sock.close()
                raise RuntimeError(f"HTTP server failed to start: {error!r}")
            await self.stop()
            raise RuntimeError(f"HTTP server did not start within {STARTUP_TIMEOUT_S} s")

    def _serving(self) -> None:
        log.info("HTTP server listening", host=self._host, port=self._port)
        if self._on_serving is not None:
            self._on_serving(self.port)

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (bounded), return when the server is down."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout=GRACEFUL_SHUTDOWN_S + 2)
        except TimeoutError:
            log.warning("HTTP server did not stop in time; cancelled")
        except (Exception, SystemExit) as exc:
            log.warning("HTTP server ended with an error", error=repr(exc))
        finally:
            self._task = None
            self._server = None
        log.info("HTTP server stopped")
