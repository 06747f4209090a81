"""What tests, benchmarks and `make demo` build on: generated checkpoints, twins of the model in
other formats, reference implementations. Outside the one-way flow: it may import any layer, and
no command imports it (tests/packaging/test_reach.py keeps test-only code here)."""
