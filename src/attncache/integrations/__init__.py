"""Backends for the harnesses users already run (lm-evaluation-harness)."""
