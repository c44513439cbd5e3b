"""The serving engine: request state, scheduler, KV block manager, output processing, the step loop."""
