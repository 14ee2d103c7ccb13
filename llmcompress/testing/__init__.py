"""Helpers shared by tests, examples and benchmarks: tiny model builders (`models`), numerics checks (`numerics`),
one-op graphs (`graphs`) and where the kernel tests can run (`devices`)."""
