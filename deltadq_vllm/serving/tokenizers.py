"""Which fine-tunes are served, and with which tokenizer, as one consistent table.

vLLM renders and detokenizes with one tokenizer per server. A fine-tune whose
tokenizer differs from the base's (added tokens, another chat template, a config that
resolves another tokenizer class) is served with exactly the tokenizer vLLM loads for
its `deltadq merge` output: its files are rebuilt from the artifact
(tokenizer_diff.py) into a directory with the fine-tune's config.json and loaded with
vLLM's own `get_tokenizer` (vllm_compat.load_tokenizer).

Runtime loads make the table change while requests arrive, so every request works
on one *snapshot*: a small ASGI middleware reads the JSON body's `model`, looks the
fine-tune up once and keeps that entry in a context variable for the whole request.
The renderer tokenizes with the snapshot's tokenizer, and when the request reaches
the engine (vllm_compat.route_tokenizers wraps the output processor's add_request)
its adapter is made consistent with the snapshot:

* vLLM resolved the same load (same adapter id): served as is;
* the name was reloaded in between: the request keeps the load it was tokenized for
  (its adapter request is replaced by the snapshot's; the engine re-verifies it);
* the name was not served when the request arrived but is now: 404 if its tokenizer
  differs from the base's (the prompt was tokenized with the base's), else served.

A name enters the table only after its weights are loaded and checked on every
worker and its tokenizer is loaded (api.py), and leaves it before the engine forgets
it; requests already holding a snapshot finish with the load they started with.
Every request therefore gets a 404 or exactly one load of the fine-tune it named.
The middleware also refuses (409) requests for a fine-tune whose files changed on
disk since it was loaded (artifact_files.ArtifactFiles.unchanged: a few syscalls; a
changed identity with unchanged bytes, e.g. a copy put back, is re-verified and served).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .. import vllm_compat
from ..tokenizer_diff import materialize, needs_own_tokenizer

log = logging.getLogger("deltadq")


@dataclass
class FineTune:
    """One load of a fine-tune: its adapter request (a unique id per load) and tokenizer."""

    name: str
    lora_request: object
    tokenizer: object | None          # None: the base's tokenizer
    files: object                     # artifact_files.ArtifactFiles of this load
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    model: str | None
    entry: FineTune | None


CURRENT: contextvars.ContextVar = contextvars.ContextVar("deltadq_request", default=None)


def finetune_tokenizer_dir(art, base_dir) -> Path | None:
    """A directory that loads as the fine-tune's own tokenizer, or None when the base's
    tokenizer is the fine-tune's (same files, same tokenizer class)."""
    ft_config = art.manifest["finetune"]["config"]
    try:
        base_config = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        base_config = {}
    if not needs_own_tokenizer(art.tokenizer_spec, ft_config, base_config):
        return None
    return materialize(art.tokenizer_files(base_dir), ft_config)


class FineTuneTable:
    def __init__(self):
        self.by_name: dict[str, FineTune] = {}
        self.tokenizer_settings: dict = {}
        self.installed = False

    # ------------------------------------------------------------------ table

    def publish(self, entry: FineTune) -> None:
        self.by_name[entry.name] = entry

    def withdraw(self, name: str) -> FineTune | None:
        return self.by_name.pop(name, None)

    def load_tokenizer(self, art, base_dir):
        d = finetune_tokenizer_dir(art, base_dir)
        if d is None:
            return None
        return vllm_compat.load_tokenizer(str(d), **self.tokenizer_settings)

    # ------------------------------------------------------------------ requests

    def current_tokenizer(self):
        snap = CURRENT.get()
        return snap.entry.tokenizer if snap is not None and snap.entry is not None else None

    def on_add_request(self, request):
        """Make the request's adapter consistent with its snapshot (module docstring);
        returns the tokenizer its output is detokenized with (None: the base's)."""
        lora = vllm_compat.request_lora(request)
        snap = CURRENT.get()
        entry = snap.entry if snap is not None else None
        if lora is None:
            return None
        if entry is not None and entry.name == lora.lora_name:
            if entry.lora_request.lora_int_id != lora.lora_int_id:
                log.info("deltadq: %r was reloaded while a request for it was prepared; "
                         "serving it with the load it was tokenized for", lora.lora_name)
                vllm_compat.set_request_lora(request, entry.lora_request)
            return entry.tokenizer
        now = self.by_name.get(lora.lora_name)
        if now is None or now.lora_request.lora_int_id != lora.lora_int_id:
            raise vllm_compat.not_found(f"The model `{lora.lora_name}` does not exist.")
        if now.tokenizer is not None:
            # tokenized without its tokenizer: it was not served when the request came in
            # (or the request bypassed the middleware: no JSON body)
            raise vllm_compat.not_found(f"The model `{lora.lora_name}` does not exist.")
        return None

    def install(self, engine_client) -> None:
        if not self.installed:
            vllm_compat.route_tokenizers(engine_client, self.current_tokenizer,
                                         self.on_add_request)
            self.installed = True


class SnapshotMiddleware:
    """Pure ASGI middleware: for every POST with a JSON body, CURRENT = Snapshot(model,
    the fine-tune entry serving that name now); the body is replayed untouched. A request
    for a fine-tune whose files changed since it was loaded is answered 409 here."""

    def __init__(self, app, table: FineTuneTable):
        self.app = app
        self.table = table

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            chunks.append(msg)
            more = msg.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in chunks)
        model = None
        if body[:1] in (b"{", b" ", b"\n", b"\t", b"\r"):
            try:
                doc = json.loads(body)
                model = doc.get("model") if isinstance(doc, dict) else None
            except ValueError:
                model = None
        model = model if isinstance(model, str) else None
        entry = self.table.by_name.get(model) if model is not None else None
        if entry is not None and entry.files.unchanged() is not None:
            # files touched since the load: still the same bytes (a copy put back)? If not,
            # this fine-tune is refused until it is restored or reloaded
            changed = await asyncio.to_thread(entry.files.recheck)
            if changed is not None:
                return await _send_error(send, 409, "ConflictError",
                                         f"fine-tune {model!r} cannot be served: {changed}; "
                                         "fix: restore its artifact, or reload it (POST "
                                         "/v1/unload_delta, then /v1/load_delta)")
        token = CURRENT.set(Snapshot(model, entry))
        try:
            await self.app(scope, _replay(chunks, receive), send)
        finally:
            CURRENT.reset(token)


async def _send_error(send, status: int, err_type: str, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": err_type, "param": None,
                                 "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _replay(messages, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
