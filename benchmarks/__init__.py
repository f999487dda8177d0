"""Performance benchmarks of the ParaThinker engine (``python -m benchmarks.engine --help``)."""
