"""A worker: one model shard, its KV cache and the step that runs it."""
