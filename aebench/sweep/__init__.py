"""Sweeps past one machine, on Ray (docs/sweeps.md, "Sweeps on a cluster"): the SPEC (spec.py),
the driver `aebench sweep` (driver.py) and its table (report.py), the worker task (worker.py),
and one MLflow server on PostgreSQL, `aebench mlflow-server` (server.py). The stages never
import this package; Ray and PostgreSQL's driver are the `sweep` extra's."""
