"""`dynasorctl bench serve`: dynasor's program scheduler against FCFS and gang scheduling.

- `workload`: programs from recorded traces, what the policies decide on them, arrivals;
- `programs`: one program as it runs (pure state machines, shared by both runners);
- `arms`: the arms, what a program came to, the scheduler timer;
- `sim`: the simulated engine (continuous batching, a per-step cost model);
- `engine`: the real engine (vLLM's AsyncLLM in a worker in `.venv-engine`);
- `fit`: the step cost measured on the real engine; `overhead`: the scheduler's own cost;
- `bench` plans and runs the cells, `metrics` and `report` make the figures, `command` is
  the CLI's body.
"""
