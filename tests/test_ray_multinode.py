"""Two Ray nodes on this machine: each pipeline stage on a node of its own, each tensor-parallel group inside
one node (as the workers themselves report), and the output still equals Hugging Face's."""

from __future__ import annotations

import pytest

from dist_infer import LLM
from parallel_helpers import build, drive, vocab_of


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray  # a required dependency: if it is broken the tests fail, they are not skipped
    from ray.cluster_utils import Cluster

    # Either node alone could hold all four workers, so only SPREAD keeps the stages apart.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_stages_on_separate_nodes_tp_groups_within_one(two_node_cluster, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    path, reference = build("llama-kv2", tmp_path)
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="ray",
             tensor_parallel_size=2, pipeline_parallel_size=2, pipeline_placement="SPREAD") as llm:
        nodes = llm.engine.executor.node_ids()  # rank order: (pp0 tp0, pp0 tp1, pp1 tp0, pp1 tp1)
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3], nodes
        assert nodes[0] != nodes[2], nodes
        assert drive(llm, vocab_of("llama-kv2")) == reference
