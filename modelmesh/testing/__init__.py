"""Real servers on loopback ports for tests and benchmarks (not used when serving)."""
