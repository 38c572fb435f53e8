"""Benchmarks run by `dynasorctl bench` (scripts that measure, not timed tests).

- `proxy_bench`: what the observe-mode proxy costs against a fast fake upstream,
  beside no proxy and a minimal pass-through (`floor_proxy`), driven by wrk (`load`).
"""
