"""The local fleet: every process of the product on loopback, for `make up`, tests and benchmarks."""
