"""vLLM general-plugin entry point (filled in by the serving work, issue #4)."""


def register() -> None:
    """Called by vLLM in every process; must stay cheap and idempotent."""
    return None
