"""API-server side: fine-tune names in the model table, runtime load/unload over HTTP.

Each `--delta-modules` entry becomes an entry of vLLM's own adapter table
(`OpenAIServingModels.lora_requests`), so routing by the OpenAI `model` field,
`/v1/models` (each fine-tune with `parent` = the base), unknown-name 404s, chat and
completion endpoints, streaming and batching are vLLM's unchanged.

Routes (JSON bodies):
    GET  /v1/deltas          the served fine-tunes with their sizes
    POST /v1/load_delta      {"delta_name": ..., "delta_path": ...}   (--enable-runtime-deltas)
    POST /v1/unload_delta    {"delta_name": ...}                       (--enable-runtime-deltas)
Middlewares: `/metrics` gets the per-fine-tune series appended (metrics.py); vLLM's 404
for an unknown `model` names the base and the fine-tunes (responses.py); every POST runs
with a snapshot of the fine-tune table (tokenizers.py).
(No `from __future__ import annotations` here: FastAPI must see the real `Request`
class in the route signatures.)

A load, static or at runtime, is one transaction per name (loads and unloads of one
name are serialized; different names load in parallel):
  1. the name rule (delta_modules.validate_delta_name), the root (runtime loads: the
     resolved path must lie under --delta-root; it is stored and never re-resolved);
  2. in this process: every checksum, the base check (content hash of every base
     tensor, cached), and the fine-tune's tokenizer rebuilt and loaded as vLLM loads
     the merged folder's (tokenizers.py);
  3. every worker loads it from the resolved path stamped with the manifest digest of
     step 2 (artifact_files.stamp): exactly what was checked, or an error;
  4. only then the name becomes routable, in one step: vLLM's adapter table and ours
     (and a `model` label of the per-fine-tune metrics).
Unloading removes the name from both tables first, then from the engine. A failure
at any step leaves nothing behind and answers 4xx with the reason; the server keeps
serving.
"""

import asyncio
import contextlib
import logging
import os
from http import HTTPStatus

from .. import vllm_compat
from ..format.artifact import DeltaArtifact
from ..format.artifact_files import stamp
from ..delta_modules import validate_delta_name
from ..engine_flags import wants_deltas
from ..errors import DeltaDQError
from .loaded import check_against_base
from .metrics import DeltaMetrics, MetricsMiddleware
from .responses import UnknownModelMiddleware
from .tokenizers import FineTune, FineTuneTable, SnapshotMiddleware

log = logging.getLogger("deltadq")


def _error(message: str, status: HTTPStatus, err_type: str = "BadRequestError"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": err_type, "param": None,
                                   "code": int(status)}}, status_code=int(status))


def validate_delta_dir(path: str, base_dir: str | None) -> DeltaArtifact:
    """Open (and checksum) a delta artifact and check it belongs to the served base."""
    art = DeltaArtifact(path)
    if base_dir is not None and os.path.isdir(base_dir):
        check_against_base(art, base_dir)
    return art


def under_root(path: str, root: str) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


class DeltaEndpointPlugin:
    name = "deltadq_api"
    required_tasks = None

    def __init__(self):
        self.engine_client = None
        self.models = None
        self.args = None
        self.enabled = False
        self.base_dir: str | None = None
        self.base_names: tuple[str, ...] = ()
        self.info: dict[str, dict] = {}
        self.table = FineTuneTable()
        self.metrics = DeltaMetrics()   # per-fine-tune series on /metrics (metrics.py)
        self._locks: dict[str, list] = {}   # name -> [asyncio.Lock, holders + waiters]

    # ------------------------------------------------------------------ startup

    async def init_state(self, engine_client, state, args) -> None:
        self.args = args
        if engine_client is None or not wants_deltas(args):
            return
        self.enabled = True
        self.engine_client = engine_client
        self.models = state.openai_serving_models
        self.base_dir = getattr(args, "model", None)
        self.base_names = vllm_compat.served_base_names(self.models)
        self.table.tokenizer_settings = vllm_compat.tokenizer_settings(
            engine_client.model_config)
        self.table.install(engine_client)
        # base requests are labelled with the first name the base is served under
        self.metrics.install(engine_client, (self.base_names or (str(self.base_dir),))[0])
        for m in getattr(args, "delta_modules", None) or []:
            err = await self.load(m.name, m.path)
            if err is not None:
                raise DeltaDQError(f"cannot serve fine-tune {m.name!r} from {m.path}: {err}",
                                   "fix or remove that --delta-modules entry")
        log.info("deltadq: serving %d fine-tune(s) on %s: %s", len(self.info), self.base_dir,
                 ", ".join(self.info))

    # ------------------------------------------------------------------ transactions

    @contextlib.asynccontextmanager
    async def _name_lock(self, name: str):
        slot = self._locks.setdefault(name, [asyncio.Lock(), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                self._locks.pop(name, None)

    def _prepare(self, name: str, resolved: str) -> FineTune:
        """Step 2 (in a thread): checksums, base check, tokenizer."""
        art = DeltaArtifact(resolved, resolved=True)
        if self.base_dir is not None and os.path.isdir(self.base_dir):
            check_against_base(art, self.base_dir)
        tokenizer = self.table.load_tokenizer(art, self.base_dir)
        size = sum(ident[2] for ident in art.files.identities.values())   # every file, manifest too
        dense = art.manifest["sizes"]["dense_bf16_bytes"]
        info = {"name": name, "path": None, "resolved_path": resolved, "digest": art.digest,
                "method": art.method, "bytes_on_disk": size,
                "true_ratio": dense / size if size else None,
                "nominal_ratio": art.manifest["sizes"].get("nominal_ratio"),
                "own_tokenizer": tokenizer is not None}
        return FineTune(name, None, tokenizer, art.files, info)

    async def load(self, name: str, path: str, root: str | None = None) -> str | None:
        """Load one fine-tune (the module docstring's steps); an error message or None."""
        try:
            validate_delta_name(name, self.base_names,
                                source="--delta-modules" if root is None else "load_delta")
        except DeltaDQError as e:
            return str(e)
        resolved = os.path.realpath(path)
        if root is not None and not under_root(resolved, root):
            return str(DeltaDQError(f"delta path {path!r} resolves to {resolved}, outside the "
                                    f"allowed root {root!r}",
                                    "put (or copy) the artifact under --delta-root"))
        async with self._name_lock(name):
            if name in self.info or name in self.models.lora_requests:
                return str(DeltaDQError(f"a fine-tune named {name!r} is already served",
                                        "unload it first (POST /v1/unload_delta) or choose "
                                        "another name"))
            try:
                entry = await asyncio.to_thread(self._prepare, name, resolved)
            except DeltaDQError as e:
                return str(e)
            LoRARequest = vllm_compat.lora_request_cls()
            entry.lora_request = LoRARequest(
                lora_name=name, lora_int_id=vllm_compat.next_lora_id(self.models),
                lora_path=stamp(resolved, entry.info["digest"]))
            try:
                await self.engine_client.add_lora(entry.lora_request)
            except Exception as e:  # the workers' own checks (or an RPC failure)
                return f"the engine could not load fine-tune {name!r}: {e}"
            entry.info["path"] = path
            # step 4: routable from here on, with everything in place (no await between)
            self.models.lora_requests[name] = entry.lora_request
            self.table.publish(entry)
            self.info[name] = entry.info
            self.metrics.add(name)   # a label value of the per-fine-tune series from now on
        log.info("deltadq: fine-tune %r loaded from %s (sha256 %s...)", name, resolved,
                 entry.info["digest"][:12])
        return None

    async def unload(self, name: str) -> str | None:
        async with self._name_lock(name):
            if name not in self.info:
                return str(DeltaDQError(f"no fine-tune named {name!r} is served",
                                        "GET /v1/deltas lists the served fine-tunes"))
            # unroutable first (no await between), then the engine forgets it; requests
            # already admitted finish with this load
            req = self.models.lora_requests.pop(name, None)
            self.table.withdraw(name)
            del self.info[name]
            if req is not None:
                await self.engine_client.remove_lora(req.lora_int_id)
        log.info("deltadq: fine-tune %r unloaded", name)
        return None

    def served_names(self) -> tuple[list[str], list[str]]:
        """(base model names, fine-tune names) a client may put in `model`."""
        if self.models is None:
            return [], []
        return list(self.base_names), list(self.models.lora_requests)

    # ------------------------------------------------------------------ routes

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request

        router = APIRouter()
        plugin = self

        @router.get("/v1/deltas")
        async def list_deltas():
            if not plugin.enabled:
                return _error("this server does not serve deltas (no --delta-modules)",
                              HTTPStatus.NOT_FOUND, "NotFoundError")
            return {"object": "list", "data": list(plugin.info.values())}

        @router.post("/v1/load_delta")
        async def load_delta(raw: Request):
            body, err = await plugin._runtime_body(raw, ("delta_name", "delta_path"))
            if err is not None:
                return err
            name, path = body["delta_name"], body["delta_path"]
            root = plugin.args.delta_root
            if not under_root(path, root):
                return _error(str(DeltaDQError(
                    f"delta path {path!r} is outside the allowed root {root!r}",
                    "put (or copy) the artifact under --delta-root")),
                    HTTPStatus.FORBIDDEN, "PermissionError")
            msg = await plugin.load(name, path, root=root)
            if msg is not None:
                return _error(msg, HTTPStatus.BAD_REQUEST)
            return {"status": "ok", "delta": plugin.info[name]}

        @router.post("/v1/unload_delta")
        async def unload_delta(raw: Request):
            body, err = await plugin._runtime_body(raw, ("delta_name",))
            if err is not None:
                return err
            msg = await plugin.unload(body["delta_name"])
            if msg is not None:
                return _error(msg, HTTPStatus.NOT_FOUND, "NotFoundError")
            return {"status": "ok", "unloaded": body["delta_name"]}

        app.include_router(router)
        # the last added runs first: /metrics, then 404s for unknown names, then snapshots
        app.add_middleware(SnapshotMiddleware, table=self.table)
        app.add_middleware(UnknownModelMiddleware, names=self.served_names)
        app.add_middleware(MetricsMiddleware, metrics=self.metrics)

    async def _runtime_body(self, raw, fields):
        if not self.enabled or not getattr(self.args, "enable_runtime_deltas", False):
            return None, _error("runtime delta loading is disabled; start the server with "
                                "--enable-runtime-deltas --delta-root DIR",
                                HTTPStatus.NOT_FOUND, "NotFoundError")
        try:
            body = await raw.json()
        except ValueError:
            return None, _error("the request body must be JSON", HTTPStatus.BAD_REQUEST)
        missing = [f for f in fields if not isinstance(body, dict)
                   or not isinstance(body.get(f), str) or not body.get(f)]
        if missing:
            return None, _error(f"missing or empty field(s) {missing}", HTTPStatus.BAD_REQUEST)
        return body, None
