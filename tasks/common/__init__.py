"""What the pipeline stages share: config, DVC/Prefect glue, MLflow glue, data readers, training
helpers. Nothing here imports a stage module."""
