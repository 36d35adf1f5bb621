"""A tiny OpenAI-compatible chat-completions server on loopback, for the DSPy tests.

It answers in DSPy's ChatAdapter format: the output fields a request asks for
are read from the last user message (``Respond with the corresponding output
fields, starting with the field `[[ ## answer ## ]]`, then ...``) and each gets
a ``[[ ## name ## ]]`` section, then ``[[ ## completed ## ]]``.

    with LMServer() as server:
        lm_args = server.lm_args()          # model, api_base, api_key for dspy.LM
        server.answer = lambda req: {...}   # scripted answers (optional)
        server.fail_status = 500            # every request fails with this status
        server.fail_status, server.fail_count = 500, 3   # ... the next 3 requests only
        server.latency = 0.2                # seconds each answer waits (concurrently)
        server.requests                      # the JSON bodies received, in order

As a separate process (for benchmarks: its threads then take nothing from
the host's interpreter): ``python tests/lm_server.py --latency 0.2`` prints
the api_base on its first line and serves until stdin closes.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LMRequest", "LMServer", "parse_fields"]

_OUTPUT_LINE = re.compile(r"Respond with the corresponding output fields[^\n]*")
_MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_JSON_LINE = re.compile(r"Respond with a JSON object in the following order of fields:[^\n]*")
_FIELD_TYPE = re.compile(
    r"`\[\[ ## (\w+) ## \]\]`(?: \(must be formatted as a valid Python ([^)]*)\))?"
)
_JSON_FIELD = re.compile(r"`(\w+)`(?: \(must be formatted as a valid Python ([^)]*)\))?")
_SECTION = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\Z)", re.S)


@dataclass
class LMRequest:
    """One chat-completions request, as the answer function sees it."""

    body: dict[str, Any]
    outputs: list[str]  # the output fields asked for, in order
    types: dict[str, str]  # output field -> Python type the prompt asks for ("" for str)
    json_mode: bool  # the JSONAdapter's format: answer with a JSON object
    inputs: dict[str, str]  # the input sections of the last user message
    system: str
    user: str

    @property
    def first_input(self) -> str:
        return next(iter(self.inputs.values()), "")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def parse_fields(body: dict[str, Any]) -> LMRequest:
    """Output field names and input values of a ChatAdapter request."""
    messages = body.get("messages") or []
    system = next((_text(m.get("content")) for m in messages if m.get("role") == "system"), "")
    user = next(
        (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    types: dict[str, str] = {}
    json_mode = False
    line = _OUTPUT_LINE.search(user)
    json_line = _JSON_LINE.search(user)
    if line is not None:
        types = {n: t or "" for n, t in _FIELD_TYPE.findall(line.group(0)) if n != "completed"}
        before = user[: line.start()]
    elif json_line is not None:
        json_mode = True
        types = {n: t or "" for n, t in _JSON_FIELD.findall(json_line.group(0))}
        before = user[: json_line.start()]
    else:  # fall back to the system prompt's output section
        marker = system.find("Your output fields are:")
        if marker >= 0:
            section = system[marker:].split("\n\n")[0]
            types = {n: "" for n in re.findall(r"^\d+\. `(\w+)`", section, re.M)}
        before = user
    inputs = {name: value.strip() for name, value in _SECTION.findall(before)}
    return LMRequest(
        body=body,
        outputs=list(types),
        types=types,
        json_mode=json_mode,
        inputs=inputs,
        system=system,
        user=user,
    )


_TYPED_DEFAULTS = {"int": "42", "float": "0.5", "bool": "True", "list": '["a", "b"]'}


def default_answer(request: LMRequest) -> dict[str, str]:
    """Deterministic: str fields echo the first input value, typed ones get a fixed value."""
    value = request.first_input
    answer = {}
    for name, type_name in request.types.items():
        typed = next((v for k, v in _TYPED_DEFAULTS.items() if type_name.startswith(k)), None)
        if typed is None and type_name.startswith("dict"):
            typed = '{"key": "value"}'
        answer[name] = typed if typed is not None else f"{name}: {value}"
    return answer


def render(request: LMRequest, answer: dict[str, Any] | str) -> str:
    if isinstance(answer, str):
        return answer
    if request.json_mode:
        return json.dumps({name: _jsonable(value) for name, value in answer.items()})
    parts = [f"[[ ## {name} ## ]]\n{answer.get(name, '')}" for name in request.outputs]
    parts += [f"[[ ## {n} ## ]]\n{v}" for n, v in answer.items() if n not in request.outputs]
    return "\n\n".join([*parts, "[[ ## completed ## ]]"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # (the default, 5, drops connections when 64 arrive at once)


@dataclass
class LMServer:
    """The server; a context manager that starts and stops it (a daemon thread)."""

    answer: Callable[[LMRequest], dict[str, Any] | str] = default_answer
    fail_status: int | None = None
    #: How many requests fail with ``fail_status`` before it is cleared (None: all of them).
    fail_count: int | None = None
    latency: float = 0.0  # seconds before each answer
    most_in_flight: int = 0  # the most requests it has had at once
    connections: int = 0  # TCP connections accepted
    chunk_size: int = 4  # characters per SSE chunk when streaming
    requests: list[dict[str, Any]] = field(default_factory=list)
    model: str = "openai/test-model"

    def __post_init__(self) -> None:
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_flight = 0

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> LMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server.connections += 1

            def do_GET(self) -> None:
                self._json(200, {"object": "list", "data": [{"id": "test-model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    self._json(400, {"error": {"message": "body is not JSON"}})
                    return
                failing = server._take_failure(body)
                try:
                    if server.latency > 0:
                        time.sleep(server.latency)
                finally:
                    server._done()
                if failing is not None:
                    self._json(
                        failing, {"error": {"message": "scripted failure", "type": "server_error"}}
                    )
                    return
                if not self.path.rstrip("/").endswith("chat/completions"):
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                request = parse_fields(body)
                content = render(request, server.answer(request))
                if body.get("stream"):
                    self._stream(body, content)
                else:
                    self._json(200, _completion(body, content))

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict[str, Any], content: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
                size = max(1, server.chunk_size)
                pieces = [content[i : i + size] for i in range(0, len(content), size)]
                deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
                deltas += [{"content": piece} for piece in pieces]
                for delta in deltas:
                    self._event(_chunk(body, ident, delta, None))
                self._event(_chunk(body, ident, {}, "stop"))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
                self.wfile.flush()

        self._httpd = _HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="lm-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> LMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- facts ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not running"
        port: int = self._httpd.server_address[1]
        return port

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def lm_args(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for ``configure_lm`` / ``dspy.LM`` against this server."""
        return {"model": self.model, "api_base": self.api_base, "api_key": "x", **extra}

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.fail_status = self.fail_count = None
            self.most_in_flight = self.connections = 0
        self.latency = 0.0
        self.answer = default_answer

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _take_failure(self, body: dict[str, Any]) -> int | None:
        """Record a request; the status it must fail with, if any."""
        with self._lock:
            self.requests.append(body)
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
            status = self.fail_status
            if status is not None and self.fail_count is not None:
                self.fail_count -= 1
                if self.fail_count <= 0:
                    self.fail_status = self.fail_count = None
            return status

    def completions(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.requests)


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}


def _completion(body: dict[str, Any], content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "test-model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(),
    }


def _chunk(
    body: dict[str, Any], ident: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "test-model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if finish is not None:
        chunk["usage"] = _usage()
    return chunk


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="a loopback OpenAI-compatible server")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    options = parser.parse_args()
    with LMServer(latency=options.latency) as server:
        print(server.api_base, flush=True)
        sys.stdin.read()  # until the parent closes it (or dies)


if __name__ == "__main__":
    main()
