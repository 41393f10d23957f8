"""Pydra workflows composed from rwcflow's tasks (installed as ``rwcflow.workflows``)."""
