"""Test support, not used by the server or the offline tools: tiny trained model fixtures
(fixtures.py and the modules it builds on) and a `deltadq serve` launcher (server.py).

It ships in the package because the demo (`python -m deltadq_vllm.demo`) and the
benchmarks build the same fixtures from an installed copy.
"""
