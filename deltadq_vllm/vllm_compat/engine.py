"""vLLM's engine side: per-fine-tune tokenizers on the request path, per-request metrics,
the engine core (admission) and the workers' adapter managers."""

from __future__ import annotations

import functools

# ------------------------------------------------------------------ per-fine-tune tokenizers


def load_tokenizer(path: str, tokenizer_mode: str = "auto", trust_remote_code: bool = False,
                   runner_type: str = "generate", pool_copies: int | None = None):
    """A tokenizer loaded exactly as vLLM loads a served model's (`get_tokenizer`: same
    class resolution from the folder's config.json, same wrappers, same truncation side);
    with pool_copies, made thread-safe as the renderer makes the base's."""
    from vllm.tokenizers.registry import get_tokenizer

    tok = get_tokenizer(path, tokenizer_mode=tokenizer_mode,
                        trust_remote_code=trust_remote_code, runner_type=runner_type)
    if pool_copies:
        from vllm.tokenizers.hf import maybe_make_thread_pool

        tok = maybe_make_thread_pool(tok, pool_copies)
    return tok


def tokenizer_settings(model_config) -> dict:
    """The load_tokenizer settings the served model's tokenizer was loaded with."""
    return {"tokenizer_mode": getattr(model_config, "tokenizer_mode", "auto"),
            "trust_remote_code": bool(getattr(model_config, "trust_remote_code", False)),
            "runner_type": getattr(model_config, "runner_type", "generate"),
            "pool_copies": (getattr(model_config, "renderer_num_workers", 0) or 0) + 1}


def request_lora(request):
    """The adapter request of an EngineCoreRequest (None: the base)."""
    return getattr(request, "lora_request", None)


def set_request_lora(request, lora_request) -> None:
    request.lora_request = lora_request


def not_found(message: str) -> Exception:
    """An exception vLLM's serving layer answers with HTTP 404 and `message`."""
    try:
        from vllm.exceptions import VLLMNotFoundError
    except ImportError:  # older vLLM: a 400 with the message
        return ValueError(message)
    return VLLMNotFoundError(message)


def route_tokenizers(engine_client, current, on_add_request) -> None:
    """Let requests for some fine-tunes use their own tokenizer in the API process.

    current():               the tokenizer of the request being handled (None: the base's),
                             read from a context variable; the renderer's `tokenizer`
                             attribute (read by rendering, tokenization, truncation, logprob
                             decoding) becomes a property returning it, and the renderer's
                             tokenizer thread pool runs tasks in the submitting context.
    on_add_request(request): called when a request reaches the engine (before the engine
                             sees it); may replace the request's adapter or raise (the
                             request then fails with that error); returns the tokenizer its
                             output is detokenized with (None: the base's).
    Private names: the renderer's `tokenizer` attribute and `_executor`,
    OutputProcessor.add_request / .tokenizer."""
    import contextvars

    renderer = engine_client.renderer
    if getattr(renderer, "_deltadq_routed", False):
        return
    cls = type(renderer)

    def _get(self):
        return current() or self.__dict__.get("tokenizer")

    def _set(self, value):
        self.__dict__["tokenizer"] = value

    # a data descriptor on the (per-instance) subclass wins over the instance attribute
    renderer.__class__ = type(cls.__name__, (cls,), {"tokenizer": property(_get, _set),
                                                     "_deltadq_routed": True})
    ex = renderer._executor
    orig_submit = ex.submit
    ex.submit = lambda fn, *a, **k: orig_submit(contextvars.copy_context().run, fn, *a, **k)
    op = engine_client.output_processor
    orig_add = op.add_request

    def add_request(request, *args, **kwargs):
        tok = on_add_request(request)
        if tok is None:
            return orig_add(request, *args, **kwargs)
        saved = op.tokenizer
        op.tokenizer = tok
        try:
            return orig_add(request, *args, **kwargs)
        finally:
            op.tokenizer = saved

    op.add_request = add_request


# ------------------------------------------------------------------ metrics


def hook_request_stats(engine_client, on_output, on_finished) -> bool:
    """Report every request's progress, with its adapter name, from vLLM's own stats.

    on_output(lora_name, prefilling, prompt_tokens, new_tokens, ttft, itl): after each
        engine output of a request; ttft (seconds from arrival) on its first output,
        itl (seconds since its previous output) on later ones, else None.
    on_finished(lora_name, finish_reason): when it finishes.
    lora_name is None for base-model requests. vLLM fills these stats only when it logs
    stats (not with --disable-log-stats); returns False if this vLLM lacks the hooks.
    Private names: OutputProcessor._update_stats_from_output/_update_stats_from_finished,
    RequestState.lora_name/.stats/.is_prefilling/.prompt_len, RequestStateStats fields."""
    op = getattr(engine_client, "output_processor", None)
    if op is None or not hasattr(op, "_update_stats_from_output"):
        return False
    if getattr(op, "_deltadq_stats_hooked", False):
        return True
    op._deltadq_stats_hooked = True
    orig_output = op._update_stats_from_output
    orig_finished = op._update_stats_from_finished

    def update_from_output(req_state, output, timestamp, iteration_stats):
        stats = req_state.stats
        prefilling = req_state.is_prefilling
        last = stats.last_token_ts if stats is not None else 0.0
        orig_output(req_state, output, timestamp, iteration_stats)
        if iteration_stats is None or stats is None:
            return
        on_output(req_state.lora_name, prefilling, req_state.prompt_len or 0,
                  len(output.new_token_ids), stats.first_token_latency if prefilling else None,
                  None if prefilling or timestamp is None else timestamp - last)

    def update_from_finished(req_state, finish_reason, iteration_stats):
        orig_finished(req_state, finish_reason, iteration_stats)
        if iteration_stats is not None and finish_reason is not None:
            on_finished(req_state.lora_name, str(finish_reason))

    op._update_stats_from_output = update_from_output
    op._update_stats_from_finished = update_from_finished
    return True


def worker_adapter_manager(worker):
    """The adapter manager (ours when serving deltas) of a vLLM worker, or None.
    Private name: the model runner's `lora_manager` attribute (LoRAModelRunnerMixin)."""
    return getattr(getattr(worker, "model_runner", None), "lora_manager", None)


# ------------------------------------------------------------------ engine core (admission)


def wrap_engine_core(**wrappers) -> None:
    """Wrap EngineCore methods: wrappers[name](original, core, *args, **kwargs). Idempotent.
    DP engine cores call these through super(), so they are covered too."""
    from vllm.v1.engine.core import EngineCore

    for name, wrapper in wrappers.items():
        orig = getattr(EngineCore, name)
        if getattr(orig, "_deltadq", False):
            continue

        def make(orig=orig, wrapper=wrapper):
            @functools.wraps(orig)
            def method(self, *args, **kwargs):
                return wrapper(orig, self, *args, **kwargs)
            method._deltadq = True
            return method

        setattr(EngineCore, name, make())


def engine_lora_ids_in_use(core) -> set[int]:
    """Adapter ids of every unfinished request the engine core's scheduler holds."""
    requests = getattr(core.scheduler, "requests", {}) or {}
    return {r.lora_request.lora_int_id for r in requests.values()
            if getattr(r, "lora_request", None) is not None}


def run_on_workers(core, fn, *args) -> list:
    """fn(worker, *args) on every worker of the engine core's executor."""
    return core.model_executor.collective_rpc(fn, args=args)


def fail_engine_request(core, request, message: str) -> None:
    """End one request the engine core received, with an error output (FinishReason.ERROR;
    the API layer answers it with HTTP 500), without adding it to the scheduler."""
    send = getattr(core, "_send_error_outputs_to_client", None)
    if send is None:  # an in-process engine: the caller sees the exception
        raise ValueError(message)
    send([request.request_id], request.client_index)
