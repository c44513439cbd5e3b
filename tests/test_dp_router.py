"""Data-parallel routing alone (plain Python): least loaded first, prefix affinity within reason."""

from __future__ import annotations

from dist_infer.engine.dp_router import DataParallelRouter


def test_least_loaded_replica_wins_without_history():
    router = DataParallelRouter(3, block_size=4)
    assert router.route(list(range(10)), loads=[50, 10, 30]) == 1
    assert router.route(list(range(100, 110)), loads=[0, 0, 0]) == 0


def test_shared_prefix_goes_where_it_was_cached():
    router = DataParallelRouter(2, block_size=4)
    system = list(range(1, 17))  # four full blocks
    assert router.route(system + [90, 91], loads=[0, 0]) == 0
    # Replica 0 is now a little busier, but it holds the prefix.
    assert router.route(system + [92, 93, 94], loads=[18, 0]) == 0
    # A prompt without the prefix goes to the idle replica.
    assert router.route([7, 7, 7, 7, 7], loads=[18, 0]) == 1


def test_affinity_yields_to_a_much_busier_replica():
    router = DataParallelRouter(2, block_size=4)
    system = list(range(1, 17))
    router.route(system, loads=[0, 0])
    assert router.route(system + [5], loads=[10_000, 100]) == 1
