"""Data-parallel routing alone (plain Python): least loaded first, ties shared round-robin, prefix affinity
within reason, only over the replicas eligible now."""

from __future__ import annotations

from collections import Counter

import pytest

from dist_infer.engine.dp_router import DataParallelRouter


def test_least_loaded_replica_wins_without_history():
    router = DataParallelRouter(block_size=4)
    assert router.route(list(range(10)), loads={0: 50, 1: 10, 2: 30}) == 1
    assert router.route(list(range(100, 110)), loads={0: 0, 1: 5, 2: 5}) == 0


def test_idle_ties_are_spread_evenly():
    # Sequential requests on idle replicas, distinct prompts (no shared prefix): they used to all go to 0.
    router = DataParallelRouter(block_size=4)
    counts = Counter(router.route([i, i + 1, i + 2, i + 3, 7], loads={0: 0, 1: 0}) for i in range(800))
    assert counts == {0: 400, 1: 400}


def test_ties_rotate_only_among_the_least_loaded():
    router = DataParallelRouter(block_size=4)
    picks = [router.route([i] * 5, loads={3: 0, 8: 9, 11: 0, 20: 0}) for i in range(5)]
    assert picks == [3, 11, 20, 3, 11]  # never 8, which carries more work
    # The rotation resumes after the previous pick (11) even when the tied set changes, and wraps around.
    assert router.route([98] * 5, loads={3: 0, 8: 0, 11: 4, 15: 0}) == 15
    assert router.route([99] * 5, loads={3: 0, 8: 0, 11: 4}) == 3


def test_shared_prefix_goes_where_it_was_cached():
    router = DataParallelRouter(block_size=4)
    system = list(range(1, 17))  # four full blocks
    assert router.route(system + [90, 91], loads={0: 0, 1: 0}) == 0
    # Replica 0 is now a little busier, but it holds the prefix.
    assert router.route(system + [92, 93, 94], loads={0: 18, 1: 0}) == 0
    # A prompt without the prefix goes to the idle replica.
    assert router.route([7, 7, 7, 7, 7], loads={0: 18, 1: 0}) == 1


def test_affinity_yields_to_a_much_busier_replica():
    router = DataParallelRouter(block_size=4)
    system = list(range(1, 17))
    router.route(system, loads={0: 0, 1: 0})
    assert router.route(system + [5], loads={0: 10_000, 1: 100}) == 1


def test_an_ineligible_prefix_owner_is_ignored():
    router = DataParallelRouter(block_size=4)
    system = list(range(1, 17))
    assert router.route(system, loads={0: 0, 1: 5, 2: 5}) == 0
    # Replica 0 is draining: the prefix does not pull the request there; the least loaded eligible one wins.
    assert router.route(system + [5], loads={1: 7, 2: 3}) == 2



def test_a_shorter_prefix_on_an_eligible_replica_wins_when_the_longer_ones_owner_is_out():
    router = DataParallelRouter(block_size=4)
    system, longer = list(range(1, 17)), list(range(1, 21))  # four blocks; five blocks
    assert router.route(longer, loads={0: 0, 1: 5, 2: 5}) == 0
    assert router.route(system, loads={0: 10_000, 1: 0, 2: 5}) == 1  # replica 1 now holds the first four
    # Replica 0 (five blocks) is failed; replica 1 (four blocks) beats the idle replica 2.
    assert router.route(longer + [1], loads={1: 9, 2: 0}) == 1


def test_forget_replica_drops_its_prefixes():
    router = DataParallelRouter(block_size=4)
    system = list(range(1, 17))
    assert router.route(system, loads={0: 0, 1: 5}) == 0
    assert router.route(system + [1], loads={0: 10, 1: 0}) == 0  # affinity
    router.forget_replica(0)  # replica 0 was rebuilt: its cache is empty
    assert router.route(system + [2], loads={0: 10, 1: 0}) == 1
    router.forget_replica(42)  # unknown replicas are fine


def test_replicas_added_at_run_time_are_used():
    router = DataParallelRouter(block_size=4)
    assert router.route([1] * 5, loads={0: 3}) == 0
    assert router.route([2] * 5, loads={0: 3, 5: 0}) == 5


def test_no_eligible_replica_is_a_clear_error():
    router = DataParallelRouter(block_size=4)
    with pytest.raises(ValueError, match="no eligible data-parallel replica"):
        router.route([1, 2, 3], loads={})


def test_block_size_must_be_positive():
    assert DataParallelRouter(8).block_size == 8
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        DataParallelRouter(0)
