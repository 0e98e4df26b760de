"""Programs compiled for a mesh: jit with explicit shardings, traced under the mesh, one
compile per argument signature.

    programs = ProgramCache()
    program = programs.get(("train_step",), mesh, args, build)   # build() runs on a miss
    outputs = program(*args)        # the arguments placed by the program's shardings first
    program.lower(*abstract_args)   # what the planner compiles, without running anything

`build() -> (function, in_shardings, out_shardings, donated argument positions)`;
out_shardings may be a function of the output shapes. The update, the scoring pass and
the sampler all compile through here. A program compiles at its first call, and the
compiler's working memory goes back to the OS before it runs (vppo_jax/parallel/host_memory.py):
otherwise its peak would stay under the program's own buffers.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from vppo_jax.parallel import host_memory, sharding


@dataclasses.dataclass
class Program:
    jitted: Any  # the jax.jit-wrapped function
    in_shardings: tuple
    compiled: Any = None  # the executable for the one signature a ProgramCache entry serves

    def __call__(self, *args):
        args = sharding.put(args, self.in_shardings)
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            host_memory.release_freed_memory()
        return self.compiled(*args)

    def lower(self, *args):
        return self.jitted.lower(*args)


def signature(args) -> tuple:
    """What a compiled program is specific to: the arguments' tree structure, shapes and dtypes."""
    return jax.tree.structure(args), tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args))


def compile_for_mesh(
    function: Callable, mesh: Mesh, args: tuple, in_shardings: tuple, out_shardings, donate: tuple[int, ...] = ()
) -> Program:
    """`function` traced under `mesh` (the model's sharding constraints name its axes) and
    jitted with these shardings; `args` (arrays or ShapeDtypeStructs) give the output shapes
    when out_shardings is a function of them."""
    traced = sharding.under_mesh(mesh, function)
    if callable(out_shardings):
        out_shardings = out_shardings(jax.eval_shape(traced, *args))
    return Program(
        jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate), in_shardings
    )


class ProgramCache:
    """Compiled programs by (key, mesh, argument signature), the least recently used dropped
    beyond `capacity`: a long run that meets many prompt lengths does not hold every program."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._programs: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, mesh: Mesh, args: tuple, build: Callable[[], tuple]) -> Program:
        cache_key = (key, mesh, signature(args))
        if cache_key in self._programs:
            self._programs.move_to_end(cache_key)
        else:
            function, in_shardings, out_shardings, donate = build()
            self._programs[cache_key] = compile_for_mesh(function, mesh, args, in_shardings, out_shardings, donate)
            while len(self._programs) > self.capacity:
                self._programs.popitem(last=False)
        return self._programs[cache_key]

    def clear(self):
        self._programs.clear()
