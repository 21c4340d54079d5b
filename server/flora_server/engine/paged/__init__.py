"""Engine v2: paged KV cache, chunked prefill, prefix caching by adapter content
(docs/engine.md)."""
