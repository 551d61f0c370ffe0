"""A user's service for the generic ``http`` destination that refuses operations with an
error body of its own making, built from the operation it was sent (a validation service
answering ``{"error": "<the value it did not like>"}``), for the privacy attacks on what the
connector keeps and prints of a refusal.

In-process use::

    with EchoSink(lambda op: (400, {"error": op["fields"]["last_name"]})) as sink:
        ... sink.url ...

An answer of ``None`` from the function accepts the operation (200, ``{"contact_id":
"c-<customer_id>"}``, or the id ``contact(op)`` makes: a service keyed by e-mail).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, MutableMapping
from contextlib import ExitStack
from typing import Any

from ._serve import http_body, serve_in_thread

Scope = MutableMapping[str, Any]
Answerer = Callable[[dict[str, Any]], tuple[int, Any] | None]


class EchoSink:
    """``POST /ops``: each operation is answered by ``answer(op)`` (a batch by its first
    refused operation's answer)."""

    def __init__(
        self, answer: Answerer, contact: Callable[[dict[str, Any]], Any] | None = None
    ) -> None:
        self.answer = answer
        self.contact = contact or (lambda op: f"c-{op.get('customer_id')}")
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ops"

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        body = await http_body(scope, receive, send)
        if body is None:
            return
        decoded = json.loads(body)
        ops = decoded if isinstance(decoded, list) else [decoded]
        with self._lock:
            self.received += ops
        status, payload = 200, None
        for op in ops:
            found = self.answer(op)
            if found is not None:
                status, payload = found
                break
        if payload is None and status == 200:
            results = [{"contact_id": self.contact(op)} for op in ops]
            payload = results if isinstance(decoded, list) else results[0]
        data = json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def __enter__(self) -> EchoSink:
        self.port = self._stack.enter_context(
            serve_in_thread(self, host="127.0.0.1", port=0, name="echo-sink")
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
