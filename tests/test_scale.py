"""Graph work is linear in the number of nodes (issue 9).

No timing assertions: the sizes are the test.  Quadratic code took 23 s for
8,000 reversed nodes and did not finish 80,000 in 120 s, so 100,000 nodes
would take about an hour; a compress of a 16k-node chain spent 21 of 22 s in
``Model.consumers()`` and would take hours at the 100k nodes used here.
Linear code does each in a few seconds.  (Loading a reversed graph from a
file is tested at 20,000 nodes in test_fuzz.py.)
"""

from __future__ import annotations

import numpy as np

import udfc_ref
from udfc_ref import Model, Node

N = 100_000


def test_reversed_100k_node_graph_validates_in_order():
    # listed last-to-first: the toposort must reorder every node
    nodes = [Node(f"i{k}", "identity", [f"v{k - 1}" if k else "x"], f"v{k}") for k in range(N)][::-1]
    m = Model({}, nodes, "x", (1, 2, 2), output_name=f"v{N - 1}")
    assert [n.name for n in m.nodes[:3]] == ["i0", "i1", "i2"] and m.nodes[-1].name == f"i{N - 1}"
    assert m.shapes[f"v{N - 1}"] == (1, 2, 2)
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    assert np.array_equal(m.forward(x), x)  # an identity chain is the identity


def _pair(i, v, c, rng, tensors, nodes):
    """conv (c -> c, 1x1) -> BN -> ReLU reading ``v``; returns the ReLU output."""
    tensors[f"c{i}.weight"] = (rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
    nodes.append(Node(f"c{i}", "conv2d", [v], f"c{i}", {}, {"weight": f"c{i}.weight"}))
    roles = {"weight": rng.uniform(0.5, 1.5, c), "bias": rng.normal(0, 0.3, c), "running_mean": rng.normal(0, 0.2, c),
             "running_var": rng.uniform(0.5, 2.0, c)}
    for r, val in roles.items():
        tensors[f"b{i}.{r}"] = val.astype(np.float32)
    nodes.append(Node(f"b{i}", "batch_norm", [f"c{i}"], f"b{i}", {"eps": 1e-5}, {r: f"b{i}.{r}" for r in roles}))
    nodes.append(Node(f"a{i}", "relu", [f"b{i}"], f"a{i}"))
    return f"a{i}"


def test_long_chain_with_real_pairs_compresses():
    """100,000 nodes: 20 conv-BN-ReLU pairs, each followed by ~5,000 identity
    nodes (the pair discovery walks every one of them), listed in reverse."""
    rng = np.random.default_rng(0)
    c, pairs = 4, 20
    gap = (N - 3 * pairs - 2) // pairs
    tensors, nodes, v = {}, [], "x"
    for i in range(pairs):
        v = _pair(i, v, c, rng, tensors, nodes)
        for k in range(gap):
            nodes.append(Node(f"id{i}_{k}", "identity", [v], f"id{i}_{k}"))
            v = f"id{i}_{k}"
    nodes.append(Node("flat", "flatten", [v], "flat"))
    tensors["fc.weight"] = rng.standard_normal((3, c * 4)).astype(np.float32)
    nodes.append(Node("fc", "linear", ["flat"], "y", {}, {"weight": "fc.weight"}))
    m = Model(tensors, nodes[::-1], "x", (c, 2, 2), output_name="y")
    assert len(m.nodes) >= N - pairs

    small, rep = udfc_ref.compress(m, prune_ratio=0.5, weight_bits=6)
    assert len(small.nodes) == len(m.nodes)
    assert {r.layer for r in rep.layers if r.pruned} == {f"c{i}" for i in range(pairs)}
    for i in range(pairs):
        assert small.tensors[f"c{i}.weight"].shape[0] == c // 2
    assert small.tensors["fc.weight"].shape == (3, (c // 2) * 4)
    x = rng.standard_normal((3, c, 2, 2)).astype(np.float32)
    y = small.forward(x)
    assert y.shape == (3, 3) and np.all(np.isfinite(y))
