"""Benchmarks: scripts that print numbers (run from the repo root with `python -m benchmarks.<name>`)."""
