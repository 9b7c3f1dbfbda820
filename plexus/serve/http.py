"""waitress, a threaded production WSGI server, on its own thread of rank 0: bound before the
model loads, counting requests in progress so that a drain knows when they are done."""

from __future__ import annotations

import threading
import time

from flask import Flask

from plexus.serve.app import DEFAULT_MAX_BODY

class HttpServer:
    """waitress (a threaded production WSGI server) on its own thread. Binding happens in the
    constructor, so a busy port fails before the model is loaded."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 8000, threads: int = 64,
                 max_body_bytes: int = DEFAULT_MAX_BODY):
        from waitress.server import create_server

        self._active, self._lock = 0, threading.Lock()
        # waitress refuses (with its own plain-text 413) only bodies far over the limit, so
        # that moderately oversized ones reach Flask and get the JSON error
        self.server = create_server(self._wsgi(app), host=host, port=port, threads=threads, ident="plexus",
                                    channel_request_lookahead=2,  # lets a handler see its client leave
                                    max_request_body_size=4 * max_body_bytes + 65536)
        listen = getattr(self.server, "effective_listen", None) or [
            (self.server.effective_host, self.server.effective_port)]
        self.host, self.port = listen[0][0], int(listen[0][1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"

    def _wsgi(self, app):
        """Count requests in progress (until their body is fully written), for a clean exit."""
        def wsgi(environ, start_response):
            with self._lock:
                self._active += 1
            try:
                body = app(environ, start_response)
            except BaseException:
                self._done()
                raise
            return _Closing(body, self._done)
        return wsgi

    def _done(self):
        with self._lock:
            self._active -= 1

    def start(self) -> None:
        threading.Thread(target=self.server.run, name="plexus-http", daemon=True).start()

    def stop_accepting(self) -> None:
        """Close the listening socket(s) from waitress's own loop thread; requests in progress
        (and their connections) carry on."""
        from waitress import wasyncore
        from waitress.server import BaseWSGIServer

        smap = getattr(self.server, "map", None) or self.server._map
        listeners = [d for d in list(smap.values()) if isinstance(d, BaseWSGIServer)]
        if listeners:
            listeners[0].trigger.pull_trigger(lambda: [wasyncore.dispatcher.close(d) for d in listeners])

    def wait_idle(self, timeout: float, linger: float = 0.05) -> bool:
        """Wait until no request is in progress; then ``linger`` for the last bytes to leave
        (waitress's loop thread sends what a handler could not)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._active <= 0:
                    break
            time.sleep(0.005)
        time.sleep(linger)
        return self._active <= 0


class _Closing:
    """A WSGI body that calls ``done`` once it is closed (waitress always closes it)."""

    def __init__(self, body, done):
        self.body, self.done, self.closed = body, done, False

    def __iter__(self):
        return iter(self.body)

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.done()
