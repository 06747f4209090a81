"""Running the model: prefill, decode, sampling, the cache it owns, thinking and answer events.

Above `model` (with `kernels` and `quant`, which it picks paths from) and `processor`; `backends`
serve its events to `tasks`, `render` draws them."""
