"""The one exception type users see: it names the problem and the fix."""


class DeltaDQError(Exception):
    """A problem with the user's input. `str()` is the full message for the terminal."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")
