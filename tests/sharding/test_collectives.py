"""The compiled decode step moves activations between devices, never a weight.

Read from the decode dispatch's compiled HLO text: every collective XLA put there, by kind, shape
and source op. Tensor parallelism needs an all-reduce after each attention output and MLP down
projection (the contracted dim is split over ``model``), a reduction over the split vocabulary
for the embedding lookup and the logits (softmax, argmax, the chosen token's log-probability),
and, in the sampling branch, gathers of one logits row per slot for the sort. Anything the size
of a weight would be a weight travelling: the test fails on it, as the control shows.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from encdec.sharding import MODEL
from tests.sharding.runs import run

_KINDS = "all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
_OP = re.compile(rf"= (\(.*?\)|\S+) ({_KINDS})(?:-start)?\(")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...], str]]:
    """``(kind, shape, source op)`` of every collective in compiled HLO text (tuples split)."""
    out = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        source = re.search(r'op_name="([^"]*)"', line)
        for _, dims in _SHAPE.findall(m.group(1)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            out.append((m.group(2), shape, source.group(1) if source else ""))
    return out


def weight_shapes(*trees) -> set[tuple[int, ...]]:
    """Every matrix's shape, and the 2-D shapes its projections reshape it to."""
    shapes = set()
    for leaf in jax.tree.leaves(trees):
        shape = tuple(leaf.shape)
        if len(shape) < 2:
            continue
        shapes.add(shape)
        for k in range(1, len(shape)):
            shapes.add((math.prod(shape[:k]), math.prod(shape[k:])))
    return shapes


def travelling_weights(found, weights: set, largest_activation: int) -> list:
    """Collectives that carry a weight: its shape, or more numbers than any activation here."""
    return [c for c in found if c[1] in weights or math.prod(c[1]) > largest_activation]


def _decode_hlo(engine) -> str:
    args = engine._decode_args()  # the same call the engine makes: compiled once, cached
    return engine._decode.lower(engine.params, engine.state, np.int32(1), **args).compile().as_text()


@pytest.mark.parametrize(
    "family, mesh_shape, projections_per_layer",
    [
        ("bart", (2, 4), 3),  # 4 heads on 4: self-attention output, cross-attention output, MLP down
        ("t5", (1, 8), 1),  # 4 heads on 8: attention replicated, only the MLP's all-reduce
    ],
)
def test_decode_step_collectives_are_tensor_parallel_only(models, family, mesh_shape, projections_per_layer):
    model = models[family]
    engine, _ = run(model, family, mesh_shape)
    found = collectives(_decode_hlo(engine))
    cfg = model.config
    slots = engine.config.num_slots // mesh_shape[0]
    vocab = engine.params["shared"]["embedding_VD"].shape[0]  # padded to a multiple of the axis
    bank = [] if engine.adapters is None else engine.adapters.stacked
    weights = weight_shapes(engine.params, jax.tree.map(lambda x: x[0], bank))
    print(f"\n{family} {mesh_shape}: {len(found)} collectives in the decode step")
    for kind, shape, source in found:
        print(f"  {kind:18s} {str(shape):14s} {source.split('/while/body/')[-1][:90]}")
    assert not travelling_weights(found, weights, slots * vocab)
    width = cfg.d_model
    all_reduces = [c for c in found if c[0] == "all-reduce"]
    projections = [c for c in all_reduces if c[1] == (slots, width) and "dot_general" in c[2]]
    assert len(projections) == projections_per_layer * cfg.decoder_layers
    embedding = [c for c in all_reduces if c[1] == (slots, 1, width) and c[2].endswith("gather")]
    assert len(embedding) == 1  # the lookup in the vocabulary-split table
    rest = [c for c in found if c not in projections and c not in embedding]
    for kind, shape, source in rest:  # vocabulary reductions: a few numbers per slot, or a logits row
        assert shape[:1] == (slots,) or kind in ("all-to-all",), (kind, shape, source)
        assert math.prod(shape) <= slots * vocab


def test_a_weight_on_the_move_is_caught(models):
    """The control: a step that gathers a split weight whole fails the check above."""
    engine, _ = run(models["bart"], "bart", (2, 4))
    w = engine.params["decoder"]["layers"][0]["ffn"]["wi"]["w"]  # [D, F], F split over model
    assert w.sharding.spec == P(None, MODEL)
    gather = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(engine.mesh, P()))
    found = collectives(gather.lower(w).compile().as_text())
    assert found and travelling_weights(found, weight_shapes(engine.params), 10**9)
