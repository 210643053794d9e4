"""Benchmarks of what ActErase costs (`python -m benchmarks.run`)."""
