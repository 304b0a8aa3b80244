"""The real services on 127.0.0.1 (`make serve` / `make stop`): Prefect server, work pool,
deployments and worker, MLflow server, and optionally a PostgreSQL cluster for both stores."""
