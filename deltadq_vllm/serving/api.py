"""API-server side: fine-tune names in the model table, runtime load/unload over HTTP.

Each `--delta-modules` entry becomes an entry of vLLM's own adapter table
(`OpenAIServingModels.lora_requests`), so routing by the OpenAI `model` field,
`/v1/models` (each fine-tune with `parent` = the base), unknown-name 404s, chat and
completion endpoints, streaming and batching are vLLM's unchanged.

Routes (JSON bodies):
    GET  /v1/deltas          the served fine-tunes with their sizes
    POST /v1/load_delta      {"delta_name": ..., "delta_path": ...}   (--enable-runtime-deltas)
    POST /v1/unload_delta    {"delta_name": ...}                       (--enable-runtime-deltas)
Runtime loads read only directories under --delta-root. A fine-tune whose artifact
carries its own tokenizer is rendered and detokenized with it (tokenizers.py).
(No `from __future__ import annotations` here: FastAPI must see the real `Request`
class in the route signatures.) Every delta is checked
against the served base (architecture, weight fingerprint) in this process before
the engine sees it, so a bad delta gets a 400 with the reason and the server keeps
serving.
"""

import asyncio
import logging
import os
from http import HTTPStatus

from .. import vllm_compat
from ..artifact import DeltaArtifact
from ..engine_flags import wants_deltas
from ..errors import DeltaDQError
from .loaded import check_against_base
from .metrics import DeltaMetrics, MetricsMiddleware
from .responses import UnknownModelMiddleware
from .tokenizers import FineTuneTokenizers, ModelContextMiddleware

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
        self.info: dict[str, dict] = {}
        self.tokenizers = FineTuneTokenizers()
        self.metrics = DeltaMetrics()   # per-fine-tune series on /metrics (metrics.py)
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ startup

    async def init_state(self, engine_client, state, args) -> None:
        self.args = args
        if engine_client is None or not wants_deltas(args):
            return
        self.enabled = True
        self.engine_client = engine_client
        self.models = state.openai_serving_models
        self.base_dir = getattr(args, "model", None)
        self.metrics.install(engine_client, self.base_names()[0])
        for m in getattr(args, "delta_modules", None) or []:
            err = await self.load(m.name, m.path)
            if err is not None:
                raise DeltaDQError(f"cannot serve fine-tune {m.name!r} from {m.path}: {err}",
                                   "fix or remove that --delta-modules entry")
        log.info("deltadq: serving %d fine-tune(s) on %s: %s", len(self.info), self.base_dir,
                 ", ".join(self.info))

    async def load(self, name: str, path: str) -> str | None:
        """Load one delta; returns an error message or None."""
        try:
            art = await asyncio.to_thread(validate_delta_dir, path, self.base_dir)
        except DeltaDQError as e:
            return str(e)
        LoadReq, _ = vllm_compat.lora_adapter_requests()
        res = await self.models.load_lora_adapter(LoadReq(lora_name=name, lora_path=path))
        if not isinstance(res, str):  # an ErrorResponse
            return getattr(getattr(res, "error", None), "message", str(res))
        if art.manifest["finetune"].get("tokenizer"):
            await asyncio.to_thread(self.tokenizers.add, name,
                                    str(art.path / art.manifest["finetune"]["tokenizer"]))
            self.tokenizers.install(self.engine_client)
        self.metrics.add(name)
        dense = art.manifest["sizes"]["dense_bf16_bytes"]
        size = art.file_bytes()
        self.info[name] = {"name": name, "path": path, "method": art.method,
                           "bytes_on_disk": size, "true_ratio": dense / size if size else None,
                           "nominal_ratio": art.manifest["sizes"].get("nominal_ratio")}
        return None

    def base_names(self) -> list[str]:
        paths = getattr(self.models, "base_model_paths", None) or []
        return [p.name for p in paths] or [str(self.base_dir)]

    def served_names(self) -> tuple[list[str], list[str]]:
        """(base model names, fine-tune names) a client may put in `model`."""
        if self.models is None:
            return [], []
        return self.base_names(), list(self.models.lora_requests)

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
                return _error(f"delta path {path!r} is outside the allowed root {root!r}",
                              HTTPStatus.FORBIDDEN, "PermissionError")
            async with plugin._lock:
                if name in plugin.info:
                    return _error(f"a fine-tune named {name!r} is already served; unload it "
                                  "first or choose another name", HTTPStatus.BAD_REQUEST)
                msg = await plugin.load(name, path)
            if msg is not None:
                return _error(msg, HTTPStatus.BAD_REQUEST)
            return {"status": "ok", "delta": plugin.info[name]}

        @router.post("/v1/unload_delta")
        async def unload_delta(raw: Request):
            body, err = await plugin._runtime_body(raw, ("delta_name",))
            if err is not None:
                return err
            name = body["delta_name"]
            async with plugin._lock:
                if name not in plugin.info:
                    return _error(f"no fine-tune named {name!r} is served", HTTPStatus.NOT_FOUND,
                                  "NotFoundError")
                req = plugin.models.lora_requests.get(name)
                _, UnloadReq = vllm_compat.lora_adapter_requests()
                await plugin.models.unload_lora_adapter(UnloadReq(lora_name=name))
                if req is not None:
                    await plugin.engine_client.remove_lora(req.lora_int_id)
                del plugin.info[name]
                plugin.tokenizers.remove(name)
            return {"status": "ok", "unloaded": name}

        app.include_router(router)
        app.add_middleware(ModelContextMiddleware, registry=self.tokenizers)
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
