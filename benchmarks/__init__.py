"""splitwire.benchmarks."""
