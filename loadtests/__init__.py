"""Load tests and benchmarks for hotswap (run with `make bench`)."""
