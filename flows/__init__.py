"""Prefect flows: compositions of the stage tasks in tasks/, holding no logic of their own."""
