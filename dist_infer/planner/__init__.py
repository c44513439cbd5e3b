"""The parallel planner: predicts how fast a tp/pp/dp layout runs by simulating the engine with a cost model."""
