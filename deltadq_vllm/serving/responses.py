"""Rewriting vLLM's HTTP responses from outside (pure ASGI, no vLLM internals).

`rewrite_response` buffers the body of the responses a predicate selects and hands it to
a function that may return a new body; every other response streams through untouched.
`UnknownModelMiddleware` uses it so an unknown `model` gets a 404 that names what the
server serves (vLLM's says only `Valid aliases: <base path>`, not the fine-tunes).
"""

from __future__ import annotations

import json


async def rewrite_response(app, scope, receive, send, select, rewrite) -> None:
    """Run `app`; when select(status) is true, the body is collected and replaced by
    rewrite(status, body) (None: unchanged), with Content-Length fixed."""
    start: dict = {}
    body: list[bytes] = []

    async def wrapped_send(message):
        if message["type"] == "http.response.start":
            if not select(message.get("status", 200)):
                return await send(message)
            start.update(message)
            return
        if not start or message["type"] != "http.response.body":
            return await send(message)
        body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        payload = b"".join(body)
        new = rewrite(start.get("status", 200), payload)
        if new is not None:
            payload = new
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    await app(scope, receive, wrapped_send)


def unknown_model_message(model: str, base_names: list[str], finetunes: list[str]) -> str:
    bases = ", ".join(f"`{b}`" for b in base_names) or "-"
    tunes = ", ".join(f"`{f}`" for f in finetunes) or "none"
    return (f"The model `{model}` does not exist. This server serves the base model {bases} "
            f"and the fine-tunes {tunes} (GET /v1/models lists them); pass one of those names "
            "in the `model` field.")


class UnknownModelMiddleware:
    """404 "model does not exist" answers name the base and every served fine-tune.

    names() -> (base names, fine-tune names) at the time of the request."""

    def __init__(self, app, names):
        self.app = app
        self.names = names

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        await rewrite_response(self.app, scope, receive, send, lambda status: status == 404,
                               self._rewrite)

    def _rewrite(self, status: int, body: bytes) -> bytes | None:
        try:
            doc = json.loads(body)
            err = doc["error"]
            message = err["message"]
        except (ValueError, KeyError, TypeError):
            return None
        if not (isinstance(message, str) and message.startswith("The model `")
                and "` does not exist." in message):
            return None
        model = message[len("The model `"):message.index("` does not exist.")]
        bases, finetunes = self.names()
        if not bases and not finetunes:  # not serving deltas: vLLM's message stands
            return None
        err["message"] = unknown_model_message(model, list(bases), list(finetunes))
        return json.dumps(doc).encode()
