"""Helpers shared by tests, examples and benchmarks: tiny model builders and numerics checks."""
