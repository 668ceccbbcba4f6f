"""Load testing for hedge: latency scenarios across modes, and the proxy overhead benchmark.

See `python -m loadtest --help`, README "Load test and overhead benchmark" and docs/design.md.
"""
