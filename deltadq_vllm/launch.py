"""Moved to `deltadq_vllm.testing.server` (test support). Import shim for code written
against the old name; remove once no branch uses it."""

from .testing.server import ENGINE_ENV, Server, free_port  # noqa: F401
