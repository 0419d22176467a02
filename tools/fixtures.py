"""Moved to `deltadq_vllm.testing.fixtures` (test support, not an offline tool).

Import shim for code written against the old name; new code imports
deltadq_vllm.testing.fixtures. Remove once no branch uses this name.
"""

from ..testing.fixtures import *  # noqa: F401,F403
from ..testing.fixtures import (BASES, FINETUNES, FIXTURE_NAMES, TASKS,  # noqa: F401
                                build_all, build_fixture, eval_problems, fixture_root,
                                task_accuracy)
from ..testing.synthetic import make_synthetic_pair  # noqa: F401

if __name__ == "__main__":  # the old CLI name: python -m deltadq_vllm.tools.fixtures
    import sys

    from ..testing.fixtures import main

    sys.exit(main())
