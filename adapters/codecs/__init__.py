"""Tensor codecs: Open Inference Protocol tensors to and from numpy, and numpy to and from each
backend's native tensor form. Pure functions, no I/O, property-tested for exact round trips
(tests/test_codecs.py). Kept apart from adapters, as MLServer keeps its codecs apart from servers.
"""
