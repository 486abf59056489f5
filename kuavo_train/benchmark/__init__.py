"""Closed-loop benchmarks on simulators we did not write."""
