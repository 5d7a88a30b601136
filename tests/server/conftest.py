"""One real server for the whole module: uvicorn in a background thread on a free loopback port, serving the
embedded model on the numpy backend. Loading once keeps the suite fast on a small CPU."""

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("openai")

API_KEY = "test-key"
N_CTX = 1024
MAX_CONCURRENCY = 2  # small, so the 429 and slot-freeing tests need only two held requests


@dataclass
class Served:
    url: str
    model_id: str
    model: object
    engine: object
    api_key: str

    def idle(self) -> None:
        """Wait until no generation is queued or running, so a test may use the model directly."""
        assert self.engine.wait_idle(120), "server still busy"


@contextlib.contextmanager
def running(app, **limits) -> Iterator[int]:
    """Serve app as `kiln serve` does (server.make_server: its connection limits) on a free loopback port."""
    from kiln.server import bind, make_server

    sock = bind("127.0.0.1", 0)
    server = make_server(app, log_level="warning", **limits)
    server.config.timeout_graceful_shutdown = 2
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()  # the engine closed the model on its own thread when the app shut down


@pytest.fixture(scope="session")
def served():
    from kiln import api
    from kiln.server import Engine, create_app

    # loaded on the engine's worker thread as `kiln serve` does; tests may still read it (numpy is thread-agnostic)
    engine = Engine(max_concurrency=MAX_CONCURRENCY, loader=lambda: api.load(None, backend="numpy", n_ctx=N_CTX))
    model = engine.model
    app = create_app(engine, api_key=API_KEY, max_body_bytes=64 * 1024)
    with running(app) as port:
        yield Served(f"http://127.0.0.1:{port}", app.state.model_id, model, engine, API_KEY)
