"""Prefect flows: orchestration only; every step is a tumorscope.stages call."""
