"""Process groups and the collectives the parallel layers use."""
