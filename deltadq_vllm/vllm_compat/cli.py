"""vLLM's CLI and plugin plumbing deltadq wraps: the serve parser's flags, the serve entry,
the plugin list, and the model runner's adapter-manager global."""

from __future__ import annotations

import functools
import os

from .versions import resolve_moved

_WORKER_MANAGER_MODULE = "vllm.v1.worker.lora_model_runner_mixin"
_WORKER_MANAGER_NAME = "LRUCacheWorkerLoRAManager"

# ------------------------------------------------------------------ worker manager


def original_worker_manager_cls():
    """vLLM's own LRUCacheWorkerLoRAManager class (what plain LoRA serving uses)."""
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    return LRUCacheWorkerLoRAManager


def install_worker_manager_factory(factory) -> None:
    """Make the model runner build its adapter manager with `factory(vllm_config, device,
    embedding_modules)` (same signature as LRUCacheWorkerLoRAManager)."""
    import importlib

    mod = importlib.import_module(_WORKER_MANAGER_MODULE)
    current = getattr(mod, _WORKER_MANAGER_NAME)
    if getattr(current, "_deltadq_factory", False):
        return
    factory._deltadq_factory = True
    setattr(mod, _WORKER_MANAGER_NAME, factory)


# ------------------------------------------------------------------ CLI


def wrap_engine_args(add_args, translate) -> None:
    """Wrap EngineArgs.add_cli_args (to add flags) and EngineArgs.from_cli_args (to turn
    our flags into engine settings before the engine is built). Idempotent."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, "_deltadq", False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__

    @functools.wraps(orig_add)
    def add_cli_args(parser, *a, **kw):
        parser = orig_add(parser, *a, **kw)
        add_args(parser)
        return parser

    def from_cli_args(cls, args):
        translate(args)
        return orig_from(cls, args)

    add_cli_args._deltadq = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)




def serve_entry():
    """What `vllm serve` does after parsing: (make_arg_parser, validate, run, parser cls)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return (resolve_moved("make_arg_parser"), resolve_moved("validate_parsed_serve_args"),
            ServeSubcommand.cmd, FlexibleArgumentParser)


def cli_env_setup() -> None:
    resolve_moved("cli_env_setup")()


def configure_logging(args) -> None:
    from vllm.logger import configure_logging_from_args

    configure_logging_from_args(args)


def general_plugin_names() -> list[str]:
    """Names of every installed `vllm.general_plugins` entry point."""
    from importlib.metadata import entry_points

    return [e.name for e in entry_points(group="vllm.general_plugins")]


def allow_plugins(*names: str) -> None:
    """Make sure VLLM_PLUGINS lets `names` load in this process and the ones it spawns.

    Endpoint plugins load only when listed in VLLM_PLUGINS; once it is set it also
    filters general plugins, so when unset it becomes every installed general plugin
    plus `names`."""
    current = os.environ.get("VLLM_PLUGINS")
    listed = current.split(",") if current is not None else general_plugin_names()
    for n in names:
        if n not in listed:
            listed.append(n)
    os.environ["VLLM_PLUGINS"] = ",".join(x for x in listed if x)
