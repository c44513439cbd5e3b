"""The parallel planner: predicts the throughput and latency of a tp/pp/dp layout before running it."""
