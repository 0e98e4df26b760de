"""Sharding over a named device mesh: ONE table from logical axis names to mesh axes.

    mesh = sharding.make_mesh(config.mesh)                  # axes (data, fsdp, tensor)
    params = sharding.put(params, sharding.param_shardings(mesh, params))
    x = sharding.constrain(x, "batch", "length", "act_embed")   # inside jitted code

Mesh axes:
    data    replicas: batch rows are split over it, nothing else.
    fsdp    batch rows AND the parameters' model dimension ("embed"): every device stores a
            slice of each weight and the compiler gathers a layer's weights where they are
            used (ZeRO-3 / fully sharded data parallelism); optimizer state is sliced alike.
    tensor  attention heads, MLP hidden units and the vocabulary (Megatron-style).

Every array names its logical axes where it is built: a parameter where the model creates
it (NNX `out_sharding` metadata on the nnx.Param), activations, the KV cache and batches in
the code that makes them. RULES maps each logical name to mesh axes: DEFAULT_RULES, with the
run's `config.sharding_rules` in their place where it names an axis (`use_rules`).
A dimension that its mesh axes do not divide is left whole (replicated): the vision MLP's
3420 units over tensor=8, say. A spec that would use one mesh axis twice is refused.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from vppo_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (None: replicated). The one table.
DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    # Activations, batches and the KV cache.
    "batch": ("data", "fsdp"),  # rows (sequences, prompts) and image patch slots
    "length": None,  # tokens of a sequence, KV cache slots
    "act_embed": None,  # the residual stream's model dim: whole on each device (rows are split)
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # Parameters (and the optimizer state, which mirrors them).
    "layers": None,  # the stacked-layer axis: every device holds its slice of every layer
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}
# The table in force: the defaults, with the run's overrides (`use_rules`). Process-wide, like
# the mesh: a process runs one config.
RULES = dict(DEFAULT_RULES)


def use_rules(overrides) -> None:
    """Puts a config's `sharding_rules` in force: (logical axis, mesh axes) pairs replace the
    default rule of that axis; mesh axes are a name, a tuple of names, or None (replicated).
    E.g. (("embed", ("fsdp", "tensor")),) splits the model dimension over both axes."""
    table = dict(DEFAULT_RULES)
    for pair in overrides:
        if isinstance(pair, str) or len(pair) != 2:
            raise InputError(
                f"sharding_rules: {pair!r} is not a (logical axis, mesh axes) pair, "
                "e.g. --config.sharding_rules=\"(('embed', ('fsdp', 'tensor')),)\"."
            )
        axis, mesh_axes = pair
        if axis not in DEFAULT_RULES:
            raise InputError(f"sharding_rules: no logical axis {axis!r}; the axes are {sorted(DEFAULT_RULES)}.")
        unknown = [name for name in _as_tuple(mesh_axes) if name not in MESH_AXES]
        if unknown:
            raise InputError(f"sharding_rules: {axis!r} -> {unknown}: not mesh axes; the mesh axes are {MESH_AXES}.")
        table[axis] = mesh_axes if mesh_axes is None or isinstance(mesh_axes, str) else tuple(mesh_axes)
    RULES.clear()
    RULES.update(table)


# --- the mesh -------------------------------------------------------------------------


def make_mesh(shape: dict | Any, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh from {axis: size} (missing axes: 1); one size may be -1,
    whatever the others leave of the devices (default: all). A mesh smaller than the devices
    takes the first ones; with several processes it must span them all."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    described = dict(zip(MESH_AXES, sizes))
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {described}: sizes must be positive, with at most one -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {described}: {len(devices)} devices do not split into groups of {fixed}.")
        sizes[free[0]] = len(devices) // fixed
    count = math.prod(sizes)
    if count > len(devices) or (count < len(devices) and jax.process_count() > 1):
        raise ValueError(
            f"mesh {described} needs {count} devices, but there are {len(devices)} "
            f"({jax.process_count()} processes): the sizes must multiply to the device count "
            "(use -1 for one axis)."
        )
    # jax.make_mesh orders the devices by the physical topology (TPU ICI rings) where it knows it.
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices[:count])


def single_device_mesh() -> Mesh:
    """This process's first device: what the code runs on when no mesh is given."""
    return make_mesh({}, jax.local_devices()[:1])


def mesh_or_default(mesh: Mesh | None) -> Mesh:
    """`mesh`, checked to use only our axis names, or the one-device mesh when None."""
    if mesh is None:
        return single_device_mesh()
    unknown = set(mesh.axis_names) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {mesh.axis_names}: {sorted(unknown)} unknown; name them from {MESH_AXES}.")
    return mesh


def under_mesh(mesh: Mesh, function):
    """`function` traced with `mesh` as the context of the model's sharding constraints."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return function(*args)

    return traced


def batch_shards(mesh) -> int:
    """How many pieces the rows of a batch are split into."""
    return math.prod(_axis_sizes(mesh).get(axis, 1) for axis in _as_tuple(RULES["batch"]))


def check_rows(rows: int, mesh, what: str):
    shards = batch_shards(mesh)
    if rows % shards:
        raise ValueError(
            f"{what}: {rows} rows do not split over the mesh's {shards} batch shards "
            f"(data x fsdp = {dict(_axis_sizes(mesh))}); make it a multiple of {shards}."
        )


# --- logical -> mesh ------------------------------------------------------------------


def logical_spec(logical, mesh, shape=None, name: str = "") -> PartitionSpec:
    """The PartitionSpec of an array whose axes have the given logical names.

    Raises if two of its axes map to the same mesh axis (a collision, whatever the mesh's
    sizes). With `shape`, an axis its mesh axes do not divide keeps the longest prefix of
    them that does (often none: replicated). Mesh axes the mesh lacks, or that are manual
    here (inside shard_map), are dropped.
    """
    sizes = _axis_sizes(mesh)
    manual = _manual_axes(mesh)
    used: dict[str, str] = {}
    spec = []
    for dim, axis in enumerate(logical):
        if axis is not None and axis not in RULES:
            raise KeyError(
                f"{name or 'array'}: logical axis {axis!r} has no rule in sharding.RULES (known: {sorted(RULES)})."
            )
        mesh_axes = _as_tuple(RULES[axis]) if axis is not None else ()
        for mesh_axis in mesh_axes:
            if mesh_axis in used:
                raise ValueError(
                    f"{name or 'array'}: logical axes {tuple(logical)} map mesh axis {mesh_axis!r} "
                    f"twice (from {used[mesh_axis]!r} and {axis!r}); give one of them other mesh axes in "
                    "config.sharding_rules."
                )
            used[mesh_axis] = axis
        mesh_axes = tuple(a for a in mesh_axes if a in sizes and a not in manual)
        if shape is not None:
            while mesh_axes and shape[dim] % math.prod(sizes[a] for a in mesh_axes):
                mesh_axes = mesh_axes[:-1]
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def named(mesh: Mesh, *logical, shape=None, name: str = "") -> NamedSharding:
    return NamedSharding(mesh, logical_spec(logical, mesh, shape, name))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gathered(shardings, mesh_axis: str):
    """The shardings with `mesh_axis` taken out: arrays whole along it."""

    def without(entry):
        kept = tuple(a for a in _as_tuple(entry) if a != mesh_axis)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return jax.tree.map(lambda s: NamedSharding(s.mesh, PartitionSpec(*map(without, s.spec))), shardings)


def per_device_attention(function, q: jax.Array, k: jax.Array, v: jax.Array, rows) -> jax.Array:
    """function(q, k, v, rows) -> an array like q, run on each device's part under the mesh
    being traced for (`jax.shard_map`), whole without one: for attention kernels the compiler
    cannot split (a custom call; keys found by a data-dependent index, which it would answer
    by gathering every device's keys). q (B, T, H, ...), k and v (B, Tk, Hkv, ...), `rows` a
    pytree of (B, ...) arrays: rows over the batch axes, heads over tensor only where it
    divides both q's and k's heads (a kv head's query heads stay on its device)."""
    mesh = jax.sharding.get_abstract_mesh()
    auto = tuple(name for name in mesh.axis_names if name not in _manual_axes(mesh)) if not mesh.empty else ()
    if not any(mesh.shape[a] > 1 for a in auto):
        return function(q, k, v, rows)
    q_spec = logical_spec(("batch", None, "act_heads") + (None,) * (q.ndim - 3), mesh, q.shape)
    kv_spec = logical_spec(("batch", None, "act_kv_heads") + (None,) * (k.ndim - 3), mesh, k.shape)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = PartitionSpec(q_spec[0]), PartitionSpec(kv_spec[0])
    row_spec = lambda a: PartitionSpec(q_spec[0], *[None] * (a.ndim - 1))
    return jax.shard_map(
        function,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, jax.tree.map(row_spec, rows)),
        out_specs=q_spec,
        axis_names=set(auto),
        check_vma=False,
    )(q, k, v, rows)


def constrain(x: jax.Array, *logical) -> jax.Array:
    """x with its sharding pinned to the logical axes, under the mesh being traced for (a
    no-op without one): guides the compiler to split rows and gather weights, not the reverse."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical, mesh, x.shape))


# --- parameters and optimizer state ---------------------------------------------------


def param_axes(param, path: str = "") -> tuple[str | None, ...]:
    """Logical axes of a parameter: the `out_sharding` metadata it was created with, e.g.
    nnx.Param(value, out_sharding=("embed", "heads"), eager_sharding=False). `path` names it
    in errors."""
    name = path or "parameter"
    axes = param.get_metadata("out_sharding", None) if isinstance(param, nnx.Variable) else None
    if axes is None:
        what = type(param).__name__ if isinstance(param, nnx.Variable) else f"a bare {type(param).__name__}"
        raise ValueError(
            f"parameter {name}: no logical axes ({what} without out_sharding metadata); create it "
            "as nnx.Param(value, out_sharding=(logical axes, one per dimension), eager_sharding=False)."
        )
    axes = tuple(axes)  # a tuple or a PartitionSpec of logical names
    ndim = len(param.get_value().shape)
    if len(axes) != ndim:
        raise ValueError(f"parameter {name} has {ndim} axes but its out_sharding metadata names {len(axes)}: {axes}.")
    return axes


def _path_name(path) -> str:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    return "/".join(str(k) for k in keys if k != "value")


def tree_paths(tree) -> Any:
    """The tree with each array leaf replaced by its '/'-joined path (nnx Variable wrappers skipped)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_name(path), tree)


def param_shardings(mesh: Mesh, params) -> Any:
    """NamedShardings for a tree of parameters (an nnx.State of arrays or ShapeDtypeStructs, as
    nnx.split or jax.eval_shape give it), each from the logical axes the parameter carries
    (`param_axes`); the result has the tree's structure, metadata included."""

    def sharding(path, param):
        name = _path_name(path)
        axes = param_axes(param, name)
        return param.replace(named(mesh, *axes, shape=param.get_value().shape, name=name))

    return jax.tree_util.tree_map_with_path(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(mesh: Mesh, optimizer, opt_state, params_shardings) -> Any:
    """The optimizer state's shardings: every parameter-shaped part (Adam's moments) like the
    parameters, everything else (step counts) replicated."""
    import optax  # the optimizer's own view of which state leaves mirror the parameters

    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_state,
        params_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


# --- batches and the KV cache ---------------------------------------------------------

# Which axis of a ModelInputs field holds the rows: position_ids is (3, B, T), the rest
# (B, ...); the vision fields hold patch slots (S, ...), split like rows.
_ROW_AXIS = {"position_ids": 1}


def inputs_shardings(mesh: Mesh, inputs, leading: int = 0) -> Any:
    """Shardings of ModelInputs (or a TrainBatch) with `leading` extra axes (micro-batches)
    before each field's own: rows and patch slots over the batch axes, the rest whole. (Rows
    are checked or padded to divide beforehand; patch slots, a power of two times 64, stay
    whole on a mesh with more batch shards than that.)"""

    def sharding(path, leaf):
        field = path.rsplit("/", 1)[-1]
        row_axis = leading + _ROW_AXIS.get(field, 0)
        logical = [None] * leaf.ndim
        logical[row_axis] = "batch"
        return named(mesh, *logical, shape=leaf.shape, name=path)

    return jax.tree.map(sharding, tree_paths(inputs), inputs)


def cache_shardings(mesh: Mesh, cache) -> Any:
    """KV cache (per layer (B, kv_heads, ., .)): rows over the batch axes, heads over tensor."""
    return jax.tree.map(lambda leaf: named(mesh, "batch", "act_kv_heads", None, None, shape=leaf.shape), cache)


def host_memory_is_separate(platform: str) -> bool:
    """Whether moving arrays to pinned host memory frees device memory on `platform`: on TPUs
    and GPUs; a CPU device's memory is host memory already (a move would only copy)."""
    return platform != "cpu"


def can_offload_to_host(mesh: Mesh) -> bool:
    """Whether the mesh's devices have a pinned host memory apart from their own."""
    device = mesh.devices.flat[0]
    has_pinned_host = "pinned_host" in {memory.kind for memory in device.addressable_memories()}
    return has_pinned_host and host_memory_is_separate(device.platform)


def on_host(shardings) -> Any:
    """The shardings in pinned host memory: the same split, off the accelerator."""
    return jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings)


def rows_shardings(mesh: Mesh, tree) -> Any:
    """Every leaf split over the batch axes along its first axis."""
    return jax.tree.map(lambda leaf: named(mesh, "batch", *[None] * (leaf.ndim - 1)), tree)


# --- placing host data ----------------------------------------------------------------


def put(tree, shardings) -> Any:
    """`tree` placed with `shardings`. Across processes every process passes the same global
    values and fills only its own devices' shards (jax.device_put cannot target devices of
    other processes); an array already placed so is returned as it is."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed PRNG keys: place their bits
            return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # a global array: resharded by a collective
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


# --- helpers --------------------------------------------------------------------------


def _as_tuple(axes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def _manual_axes(mesh) -> set[str]:
    types = getattr(mesh, "axis_types", None) or ()
    return {name for name, kind in zip(mesh.axis_names, types) if kind == AxisType.Manual}
