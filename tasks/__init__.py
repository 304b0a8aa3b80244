"""Pipeline stages: one module per stage, each a pure core, a DVC entry point and a Prefect task."""
