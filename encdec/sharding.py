"""Meshes and logical-axis rules: parameters, KV page pools and decode slots over ``data`` x ``model``.

JAX's own SPMD machinery does the work; this module only says where each array lives.

- **Tensor parallelism** (``model``): every weight names its dims with logical axes
  (:func:`logical_axes`: ``heads``, ``mlp``, ``vocab``, ``embed``, ``kv``) and :data:`RULES` puts
  heads, MLP hidden units and the vocabulary on ``model``. XLA's partitioner then runs each
  device's heads and hidden units locally and inserts the Megatron collectives: an all-reduce after
  the attention output and MLP down projections (the contracted dim is split) and reductions over
  the split vocabulary (embedding lookup, logits, argmax or softmax).
- **Data parallelism** (``data``): decode slots, encoder batch rows and the pages of both pools
  are split in contiguous blocks; data shard ``d`` owns slots ``d * B/D ..`` and pages
  ``d * P/D ..``, and the engine's steps run per data shard under :func:`over_data`
  (``shard_map``), so page ids and a beam group's slot ids on device are local to the shard and
  a page table never reaches across shards.

A dim the mesh axis does not divide is never an error. A vocabulary that does not divide (BART's
50,265, Whisper's 51,865) is padded with zero rows up to the next multiple (:func:`pad_param`:
the embedding, the LM head and BART's logits bias; the model cuts its logits back to the
vocabulary, so padded ids are never produced). An attention block whose heads do not divide (3
or 5 heads on a 4-way axis) is replicated, its KV pools too, as is an MLP width that does not
divide.

Several hosts: call ``jax.distributed.initialize()`` in every process first (see
``docs/SHARDING.md``); :func:`make_mesh` then spans every process's devices and every process
runs the same engine code (multi-controller SPMD).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"

RULES = {"heads": MODEL, "mlp": MODEL, "vocab": MODEL}
"""Logical axis -> mesh axis; logical axes not listed (``embed``, ``kv``) are replicated."""

PADDED = ("vocab",)
"""Logical axes padded up to a multiple of their mesh axis (the others are replicated when it
does not divide them)."""

_PROJECTION_AXES = {
    "q": (("embed", "heads", "kv"), ("heads", "kv")),
    "k": (("embed", "heads", "kv"), ("heads", "kv")),
    "v": (("embed", "heads", "kv"), ("heads", "kv")),
    "o": (("heads", "kv", "embed"), ("embed",)),
    "wi": (("embed", "mlp"), ("mlp",)),
    "wi_0": (("embed", "mlp"), ("mlp",)),
    "wi_1": (("embed", "mlp"), ("mlp",)),
    "wo": (("mlp", "embed"), ("embed",)),
    "lm_head": (("embed", "vocab"), ("vocab",)),
    "conv1": ((None, None, "embed"), ("embed",)),
    "conv2": ((None, None, "embed"), ("embed",)),
}
"""Projection name -> logical axes of its ``w`` and ``b`` (the tree of ``encdec.models.transformer``)."""

_LEAF_AXES = {
    "embedding_VD": ("vocab", "embed"),
    "embedding_scale_V": ("vocab",),
    "pos_embedding_KD": (None, "embed"),
    "rel_bias_NR": ("heads", None),
    "final_logits_bias_V": ("vocab",),
    "scale": ("embed",),
    "bias": ("embed",),
}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``data * model`` of ``devices`` (default: every
    device of every process).

    Devices along ``model`` are neighbours in JAX's device order (one host's GPUs, joined by
    NVLink), so tensor-parallel all-reduces stay inside a host and ``data`` spans hosts.
    """
    shape = tuple(shape)
    if len(shape) != 2 or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"mesh_shape must be two positive integers (data, model), got {shape!r}")
    devices = list(jax.devices() if devices is None else devices)
    if shape[0] * shape[1] > len(devices):
        raise ValueError(
            f"mesh_shape {shape} needs {shape[0] * shape[1]} devices; there are {len(devices)} "
            "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
        )
    grid = np.asarray(devices[: shape[0] * shape[1]], dtype=object).reshape(shape)
    return Mesh(grid, (DATA, MODEL), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def check_mesh(mesh: Mesh, shape: Sequence[int] | None = None) -> None:
    """Raise ``ValueError`` unless ``mesh`` has the axes ``(data, model)`` (and ``shape``, if given)."""
    if tuple(mesh.axis_names) != (DATA, MODEL):
        raise ValueError(f"the mesh's axes must be ({DATA!r}, {MODEL!r}), got {tuple(mesh.axis_names)}")
    if shape is not None and tuple(mesh.devices.shape) != tuple(shape):
        raise ValueError(f"mesh_shape={tuple(shape)} but the mesh given is {tuple(mesh.devices.shape)}")


def axis_size(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None else mesh.shape[axis]


# ---- parameters ----------------------------------------------------------------------------------


def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at ``path`` (its keys in the tree); unknown leaves: none."""
    keys = [k for k in path if isinstance(k, str)]
    axes: tuple[str | None, ...] | None = None
    if keys and keys[-1] in _LEAF_AXES:
        axes = _LEAF_AXES[keys[-1]]
    elif len(keys) >= 2 and keys[-1] in ("w", "b", "w_scale") and keys[-2] in _PROJECTION_AXES:
        w_axes, b_axes = _PROJECTION_AXES[keys[-2]]
        axes = w_axes if keys[-1] == "w" else b_axes  # an int8 weight's scales: its output dims
    if axes is None or len(axes) != ndim:
        return (None,) * ndim
    return axes


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The partition spec of an array with these logical axes by :data:`RULES`: a dim its mesh
    axis does not divide is replicated."""
    out: list[str | None] = [None] * len(axes)
    for i, name in enumerate(axes):
        target = RULES.get(name)
        if target is not None and target not in out and shape[i] % mesh.shape[target] == 0:
            out[i] = target
    return P(*out)


def param_spec(path: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> P:
    """The spec of a parameter of (padded) ``shape``."""
    return spec_for(logical_axes(path, len(shape)), shape, mesh)


def padding(path: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> list[tuple[int, int]]:
    """Zeros to append to each dim of the parameter at ``path`` (:data:`PADDED` axes only)."""
    pads = []
    for name, size in zip(logical_axes(path, len(shape)), shape, strict=True):
        target = RULES.get(name)
        pads.append((0, -size % mesh.shape[target] if name in PADDED else 0))
    return pads


def pad_param(path: Sequence[Any], array: Any, mesh: Mesh) -> Any:
    """``array`` with its vocabulary padded to a multiple of the ``model`` axis (host or device)."""
    pads = padding(path, np.shape(array), mesh)
    if not any(after for _, after in pads):
        return array
    return jax.numpy.pad(array, pads) if isinstance(array, jax.Array) else np.pad(array, pads)


def _key(entry: Any) -> Any:
    """A tree key path entry's plain key (dict key or list index)."""
    for name in ("key", "idx", "name"):
        if hasattr(entry, name):
            return getattr(entry, name)
    return entry


def place(array: Any, sharding: NamedSharding, dtype: Any = None) -> jax.Array:
    """``array`` (host or device) on ``sharding``, each device receiving only its own block.

    Host arrays go through ``make_array_from_callback``, which slices one block per local device
    (every process passes the same array, as in multi-host loading).
    """
    if isinstance(array, jax.Array):
        return jax.device_put(array if dtype is None else array.astype(dtype), sharding)
    host = np.asarray(array) if dtype is None else np.asarray(array, dtype=dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_param(path: Sequence[Any], array: Any, dtype: Any, mesh: Mesh | None) -> jax.Array:
    """One parameter on the mesh, padded and split by the rules (``mesh=None``: the default
    device, as without sharding). Parameters already placed so are returned as they are."""
    if mesh is None:
        return jax.numpy.asarray(array, dtype=dtype)
    shape = np.shape(array)
    padded = tuple(n + after for n, (_, after) in zip(shape, padding(path, shape, mesh), strict=True))
    sharding = NamedSharding(mesh, param_spec(path, padded, mesh))
    if isinstance(array, jax.Array) and array.shape == padded and array.sharding == sharding:
        return array if dtype is None else array.astype(dtype)
    return place(pad_param(path, array, mesh), sharding, dtype)


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Parameters padded and placed by the rules (see the module doc)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: place_param([_key(k) for k in kp], x, None, mesh), params
    )


# ---- LoRA adapters -----------------------------------------------------------------------------


def adapter_spec(path: Sequence[Any], leaf: str, shape: Sequence[int], mesh: Mesh, rows: bool) -> P:
    """Spec of an adapter's ``a`` / ``b`` at ``path``, split like the weight it adapts.

    ``a`` is ``[*in, r]`` and ``b`` ``[r, *out]`` (``rows``: a leading bank-row axis): they take the
    weight's input and output axes, the rank and the row axis are replicated.
    """
    lead = (None,) if rows else ()
    ndim = len(shape) - len(lead)
    if leaf not in ("a", "b"):
        return P()
    *_, name = [k for k in path if isinstance(k, str)] or [None]
    w_axes = _PROJECTION_AXES.get(name, ((),))[0]
    in_ndim = ndim - 1 if leaf == "a" else len(w_axes) - (ndim - 1)
    if not w_axes or not 0 <= in_ndim <= len(w_axes):
        return P()
    axes = (*lead, *w_axes[:in_ndim], None) if leaf == "a" else (*lead, None, *w_axes[in_ndim:])
    return spec_for(axes, shape, mesh) if len(axes) == len(shape) else P()


def adapter_shardings(tree: Any, mesh: Mesh, *, rows: bool = False) -> Any:
    """``NamedSharding`` for every leaf of an adapter tree, or of any tree whose adapter leaves sit
    under the same keys (an optimizer state's moments): a leaf under ``.../q/a`` is split like ``q``."""

    def one(kp, x):
        keys = [_key(k) for k in kp]
        leaf = keys[-1] if keys else None
        path = keys[:-1]
        if any(k in ("encoder", "decoder") for k in path):
            start = max(i for i, k in enumerate(path) if k in ("encoder", "decoder"))
            path = path[start:]
        return NamedSharding(mesh, adapter_spec(path, leaf, np.shape(x), mesh, rows))

    return jax.tree_util.tree_map_with_path(one, tree)


# ---- running per shard -------------------------------------------------------------------------


def over_data(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """``fn`` run once per data shard on its block of slots and pages (``model`` stays automatic:
    XLA partitions each shard's work over its model devices)."""
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={DATA}, check_vma=False
    )


def per_head_shard(fn: Callable, num_heads: int, *, has_bias: bool) -> Callable:
    """``fn(q_BNH, k_pool, v_pool, table_BM, lengths_B, bias_NR)`` run once per ``model`` device on
    its heads, when traced inside a mesh whose ``model`` axis splits ``num_heads``; else ``fn``.

    For custom kernels (Pallas), which XLA's partitioner cannot split: the pools are stacked
    ``[L, N, P, G, H]``, the query ``[B, N, H]``, the bias ``[N, R]``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names:
        return fn
    size = mesh.shape[MODEL]
    manual = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[MODEL] == jax.sharding.AxisType.Manual
    if size == 1 or num_heads % size or manual:
        return fn
    heads = P(None, MODEL)
    in_specs = (heads, heads, heads, P(), P(), P(MODEL) if has_bias else None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=heads, axis_names={MODEL}, check_vma=False
    )


# ---- accounting --------------------------------------------------------------------------------


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes each (local) device holds of ``tree``'s arrays."""
    out: dict[jax.Device, int] = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return dict(out)


def split_bytes(tree: Any, mesh: Mesh) -> dict[str, int]:
    """Total bytes of ``tree`` by how they are placed: ``sharded`` (split over the whole mesh
    or one axis: counted once) and ``replicated`` (every device holds them), and ``expected``:
    what each device should hold, ``sum(nbytes / number of blocks)``."""
    sharded = replicated = expected = 0
    for leaf in jax.tree.leaves(tree):
        spec = leaf.sharding.spec if isinstance(leaf.sharding, NamedSharding) else P()
        blocks = 1
        for entry in spec:
            for name in (entry,) if isinstance(entry, str) else (entry or ()):
                blocks *= mesh.shape[name]
        if blocks == 1:
            replicated += leaf.nbytes
        else:
            sharded += leaf.nbytes
        expected += leaf.nbytes // blocks
    return {"sharded": sharded, "replicated": replicated, "expected": expected}


def to_host(tree: Any) -> Any:
    """``tree``'s arrays as numpy; arrays spread over several processes are gathered first (every
    process calls this in step, as it calls every jitted step)."""
    if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
