"""Benchmarks shipped to the nodes with the trainer (run under torchrun)."""
