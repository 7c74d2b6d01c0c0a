"""The config walker on configs of every era: Keras 3 files, live models' configs (tuples),
Keras 2 nodes and Keras <= 2.1's bare Sequential lists."""

from __future__ import annotations

import json

from fusecli.config import walker


def _tensor(name: str, node: int = 0, tensor: int = 0, *, as_tuple: bool = False) -> dict:
    history = (name, node, tensor) if as_tuple else [name, node, tensor]
    return {
        "class_name": "__keras_tensor__",
        "config": {"shape": [None, 3], "keras_history": history},
    }


def _functional(as_tuple: bool) -> dict:
    ref = tuple if as_tuple else list
    inner = {
        "class_name": "Sequential",
        "config": {"name": "tower", "layers": [{"class_name": "Dense", "config": {"name": "d"}}]},
        "name": "tower",
        "inbound_nodes": [{"args": ref([_tensor("x", as_tuple=as_tuple)]), "kwargs": {}}],
    }
    return {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                {"class_name": "InputLayer", "name": "x", "config": {"name": "x"}},
                inner,
                {
                    "class_name": "Add",
                    "name": "add",
                    "config": {"name": "add"},
                    "inbound_nodes": [
                        {
                            "args": ref(
                                [[_tensor("tower", as_tuple=as_tuple), _tensor("x", as_tuple=True)]]
                            ),
                            "kwargs": {},
                        }
                    ],
                },
            ],
            "input_layers": ref([ref(["x", 0, 0])]),
            "output_layers": ref(["add", 0, 0]),
        },
    }


def test_lists_and_tuples_read_alike():
    for as_tuple in (False, True):
        config = _functional(as_tuple)
        names = [(path, walker.name(e)) for path, e in walker.walk(config)]
        assert names == [
            (("x",), "x"),
            (("tower",), "tower"),
            (("tower", "d"), "d"),
            (("add",), "add"),
        ]
        assert [list(r) for r in walker.io_refs(config["config"]["input_layers"])] == [["x", 0, 0]]
        assert [list(r) for r in walker.io_refs(config["config"]["output_layers"])] == [
            ["add", 0, 0]
        ]
        add = walker.layers(config)[2]
        inputs = walker.call_inputs(add["inbound_nodes"][0])
        assert [list(ref) for ref, _ in inputs] == [["tower", 0, 0], ["x", 0, 0]]
        assert all(tensor["shape"] == [None, 3] for _, tensor in inputs)
        assert [list(r)[0] for r in walker.references(add["inbound_nodes"])] == ["tower", "x"]


def test_keras2_nodes_and_bare_sequential():
    node = [["a", 0, 0, {"value": ["b", 1, 0]}], ["c", 0, 1, {"value": ["b", 1, 0]}]]
    assert walker.keras2_entries(node) is node
    assert [r[0] for r, _ in walker.call_inputs(node)] == ["a", "c"]
    assert walker.call_kwargs(node) == {"value": ["b", 1, 0]}
    # References in the call kwargs count too.
    assert [r[0] for r in walker.references([node])] == ["a", "b", "c", "b"]
    single = ["op", 0, 0, {"y": 2.0}]  # a TFOpLambda's call
    assert [r[0] for r, _ in walker.call_inputs(single)] == ["op"]
    assert walker.call_kwargs(single) == {"y": 2.0}
    bare = {
        "class_name": "Sequential",
        "config": [{"class_name": "Dense", "config": {"name": "d"}}],
    }
    assert walker.is_model(bare)
    assert [walker.name(e) for e in walker.layers(bare)] == ["d"]
    assert walker.layers({"class_name": "Dense", "config": {"name": "d"}}) == []


def test_io_refs_flatten_dicts_by_key():
    spec = {"b": ["y", 0, 0], "a": [["x", 0, 0], ("z", 1, 0)]}
    assert [r[0] for r in walker.io_refs(spec)] == ["x", "z", "y"]
    assert [r[0] for r in walker.io_refs(json.loads(json.dumps(spec)))] == ["x", "z", "y"]


def test_wrapped_layers_on_request():
    wrapper = {
        "class_name": "TimeDistributed",
        "config": {"name": "td", "layer": {"class_name": "Dense", "config": {"name": "d"}}},
    }
    model = {"class_name": "Sequential", "config": {"name": "s", "layers": [wrapper]}}
    assert [e["class_name"] for _, e in walker.walk(model)] == ["TimeDistributed"]
    assert [e["class_name"] for _, e in walker.walk(model, wrapped=True)] == [
        "TimeDistributed",
        "Dense",
    ]
