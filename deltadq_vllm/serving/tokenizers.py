"""Fine-tunes served with their own tokenizer (when it differs from the base's, e.g. a
fine-tune that added tokens).

vLLM renders and detokenizes with one tokenizer per server. For requests whose
`model` is such a fine-tune, the API process uses the fine-tune's tokenizer instead
(vllm_compat.route_tokenizers): its added tokens are recognised in its prompts and
decoded in its outputs, while base requests keep the base's tokenizer behaviour.
The request's model name reaches the renderer through a context variable set by a
small ASGI middleware that reads the JSON body's `model` field.
"""

import contextvars
import json

from .. import vllm_compat

CURRENT_MODEL: contextvars.ContextVar = contextvars.ContextVar("deltadq_model", default=None)
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
                "/detokenize")


class FineTuneTokenizers:
    def __init__(self):
        self.by_name: dict = {}
        self.installed = False

    def add(self, name: str, path: str) -> None:
        self.by_name[name] = vllm_compat.load_tokenizer(path)

    def remove(self, name: str) -> None:
        self.by_name.pop(name, None)

    def for_adapter(self, name: str | None):
        return self.by_name.get(name) if name else None

    def current(self):
        return self.for_adapter(CURRENT_MODEL.get())

    def install(self, engine_client) -> None:
        if not self.installed:
            vllm_compat.route_tokenizers(engine_client, self.current, self.for_adapter)
            self.installed = True


class ModelContextMiddleware:
    """Pure ASGI middleware: CURRENT_MODEL = the JSON body's "model" for the routed paths
    (only while some fine-tune has its own tokenizer; the body is replayed untouched)."""

    def __init__(self, app, registry: FineTuneTokenizers):
        self.app = app
        self.registry = registry

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or not self.registry.by_name or scope.get("path") not in ROUTED_PATHS):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            chunks.append(msg)
            more = msg.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in chunks)
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            model = None
        token = CURRENT_MODEL.set(model if isinstance(model, str) else None)
        try:
            await self.app(scope, _replay(chunks, receive), send)
        finally:
            CURRENT_MODEL.reset(token)


def _replay(messages, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
