"""A small Upstash-REST-to-Redis bridge for tests: the real upstash-redis client talks HTTP to
this server on 127.0.0.1, which runs each command on the local Redis (so Lua scripts, such as
upstash-ratelimit's, are evaluated by a real Redis)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis


def _encode(value: Any, b64: bool) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, list):
        return [_encode(v, b64) for v in value]
    if isinstance(value, str) and b64 and value != "OK":
        return base64.b64encode(value.encode()).decode()
    return value


@contextmanager
def bridge(token: str, redis_url: str = "redis://127.0.0.1:6379/0") -> Iterator[str]:
    client = redis.Redis.from_url(redis_url)
    client.ping()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {token}":
                self._reply(401, {"error": "Unauthorized"})
                return
            b64 = self.headers.get("Upstash-Encoding") == "base64"
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path.rstrip("/") in ("/pipeline", "/multi-exec"):
                self._reply(200, [self._run(cmd, b64) for cmd in body])
            else:
                self._reply(200, self._run(body, b64))

        def _run(self, command: list[Any], b64: bool) -> dict[str, Any]:
            if str(command[0]).lower() in ("eval", "eval_ro") and isinstance(command[1], str):
                # Upstash accepts the allow-key-locking flag (a Dragonfly extension) that
                # upstash-ratelimit's scripts declare; Redis 7.0 rejects it, so drop it here.
                command = [
                    command[0],
                    command[1].replace("flags=allow-key-locking", ""),
                    *command[2:],
                ]
            try:
                return {"result": _encode(client.execute_command(*command), b64)}
            except redis.ResponseError as exc:
                return {"error": str(exc)}

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        client.close()
