"""Adapters for model libraries (optional dependencies, imported on demand)."""
