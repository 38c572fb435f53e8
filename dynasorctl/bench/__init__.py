"""Benchmarks run by `dynasorctl bench` (scripts that measure, not timed tests).

- `proxy_bench`: what the observe-mode proxy costs against a fast fake upstream,
  beside no proxy and a minimal pass-through (`floor_proxy`), driven by wrk (`load`).
- `serve`: dynasor's program scheduler against FCFS and gang scheduling, on the real
  in-process engine or a simulated one (`dynasorctl bench serve`).
"""
