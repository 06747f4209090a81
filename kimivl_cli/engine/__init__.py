"""Running the model: prefill, decode, sampling, the cache it owns, thinking and answer events."""
