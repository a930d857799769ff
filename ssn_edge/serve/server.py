"""Run the app with uvicorn: in the foreground (the CLI), or in a thread (tests, benchmarks) until stopped."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass

import uvicorn

from ssn_edge.serve.app import create_app
from ssn_edge.serve.registry import Registry, ServeOptions

DEFAULT_HOST = "127.0.0.1"  # the IPC's own programs; another address only when the line's network needs it


def _config(registry: Registry, options: ServeOptions, host: str, port: int) -> uvicorn.Config:
    # access_log off: the app writes its own structured line per request; one event loop, inference in threads
    return uvicorn.Config(create_app(registry, options), host=host, port=port, access_log=False, log_config=None,
                          timeout_keep_alive=30)


def _access_lines_to_stderr() -> None:
    """The access log as bare JSON lines on stderr (one per request, for a log shipper), not under the CLI's
    'INFO ' prefix."""
    access = logging.getLogger("ssn_edge.serve.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


def serve(registry: Registry, options: ServeOptions, host: str = DEFAULT_HOST, port: int = 8000) -> None:
    """Serve until SIGINT/SIGTERM; the models are closed on the way out."""
    _access_lines_to_stderr()
    try:
        uvicorn.Server(_config(registry, options, host, port)).run()
    finally:
        registry.close()


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Running:
    """A server started by start_in_thread; stop() shuts it down and waits for the thread."""

    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(registry: Registry, options: ServeOptions, host: str = DEFAULT_HOST, port: int | None = None,
                    start_timeout_s: float = 30.0) -> Running:
    port = port or free_port(host)
    server = uvicorn.Server(_config(registry, options, host, port))
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, name="ssn-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on {host}:{port} did not start")
        time.sleep(0.02)
    return Running(server, thread, f"http://{host}:{port}")
