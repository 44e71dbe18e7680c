"""Fidelity metrics and benchmarks."""
