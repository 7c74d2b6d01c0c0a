"""Where a layer's variables sit in a `.keras` file, in the order `.h5` files list them.

An `.h5` file lists a layer's weights in `trainable_weights + non_trainable_weights` order (the
order both Kerases' legacy loaders assign them in). A `.keras` file stores a layer's own
variables at `vars/<i>` in that order, and those of the layers it holds under the attribute
that holds them: an RNN's cell at `cell/`, a wrapper's layer at `layer/`, Bidirectional's two
at `forward_layer/` and `backward_layer/`, MultiHeadAttention's four projections at
`query_dense/`, `key_dense/`, `value_dense/`, `output_dense/`, stacked cells at
`cell/cells/<class key>/` (Keras 3's `saving_lib`, read from files it wrote).
"""

from __future__ import annotations

from typing import Any

from fusecli.formats.keras2_flat import NotFlat
from fusecli.formats.weights_layout import class_keys

_CELL_LAYERS = ("SimpleRNN", "GRU", "LSTM", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
_MHA_PARTS = ("query_dense", "key_dense", "value_dense", "output_dense")
# Layers known to hold only variables of their own (anything else with weights is refused).
_COMPOSITE = ("Bidirectional", "TimeDistributed", "RNN", "MultiHeadAttention", *_CELL_LAYERS)


def var_paths(class_name: str, config: dict[str, Any], count: int) -> list[str]:
    """The `.keras` paths (below the layer's group) of a layer's `count` variables, in `.h5`
    order. Raises `NotFlat` for layers whose variables cannot be placed without Keras."""
    if class_name in _CELL_LAYERS:
        return [f"cell/vars/{i}" for i in range(count)]
    if class_name == "TimeDistributed":
        inner = config.get("layer") or {}
        return [f"layer/{p}" for p in var_paths(str(inner.get("class_name")), _conf(inner), count)]
    if class_name == "Bidirectional":
        if count % 2:
            raise NotFlat("a Bidirectional layer with an odd number of weights")
        inner = config.get("layer") or {}
        back = config.get("backward_layer") or inner
        half = count // 2
        forward = var_paths(str(inner.get("class_name")), _conf(inner), half)
        backward = var_paths(str(back.get("class_name")), _conf(back), half)
        return [f"forward_layer/{p}" for p in forward] + [f"backward_layer/{p}" for p in backward]
    if class_name == "MultiHeadAttention":
        per = 2 if config.get("use_bias", True) else 1
        if count != 4 * per:
            raise NotFlat(f"a MultiHeadAttention layer with {count} weights")
        return [f"{part}/vars/{i}" for part in _MHA_PARTS for i in range(per)]
    if class_name == "RNN":
        cell = config.get("cell")
        cells = cell if isinstance(cell, list) else None
        if isinstance(cell, dict) and cell.get("class_name") == "StackedRNNCells":
            cells = _conf(cell).get("cells")
        if cells is None:
            return [f"cell/vars/{i}" for i in range(count)]
        return _stacked(cells, count)
    return [f"vars/{i}" for i in range(count)]


def _stacked(cells: list[dict[str, Any]], count: int) -> list[str]:
    sizes = [_cell_size(c) for c in cells]
    if sum(sizes) != count:
        raise NotFlat("stacked RNN cells whose weights cannot be told apart")
    keys = class_keys(str(cell.get("class_name")) for cell in cells)
    return [
        f"cell/cells/{key}/vars/{i}"
        for key, size in zip(keys, sizes, strict=True)
        for i in range(size)
    ]


def _cell_size(cell: dict[str, Any]) -> int:
    if cell.get("class_name") not in ("SimpleRNNCell", "GRUCell", "LSTMCell"):
        raise NotFlat(f"a stacked {cell.get('class_name')} cell")
    return 3 if _conf(cell).get("use_bias", True) else 2


def _conf(spec: dict[str, Any]) -> dict[str, Any]:
    conf = spec.get("config")
    return conf if isinstance(conf, dict) else {}
