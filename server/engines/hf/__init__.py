"""The transformers engine: iteration-level batching with per-request KV slots, capping hooks."""
