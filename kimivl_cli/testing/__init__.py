"""What tests, benchmarks and `make demo` build on: generated checkpoints, twins of the model in
other formats, reference implementations; the commands never import it."""
