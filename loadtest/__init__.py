"""Load testing for hedge: latency scenarios across modes, and the proxy overhead benchmark.

See `python -m loadtest --help`, DESIGN.md §6 and §7.
"""
