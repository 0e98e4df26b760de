"""A compiled program's cost with every loop counted as often as it runs.

    cost = hlo_cost.loop_cost(compiled.as_text(), dynamic_trips=512)
    cost.flops                # matmul FLOPs per device, each loop body times its trip count
    cost.cycle_scale          # the compiler's estimated cycles, loops counted, over them counted once
    cost.loops                # [(trip count, known?), ...] of every while loop, outermost first

XLA's cost analysis (`compiled.cost_analysis()`: flops, bytes accessed and, from the TPU
compiler, optimal_seconds) walks each computation of the program once, so a while loop's
body counts as one iteration, at any depth: a scan over 28 decoder layers counts one layer,
a decode loop one token. Here the optimized HLO text is read instead:
- which computation runs inside which loop, and each loop's trip count: from the loop's
  `known_trip_count`, else its condition `counter < N` with the counter starting at a
  constant and growing by the constant its body adds (what lax.scan and fori_loop lower
  to, and the SPMD partitioner's windowed matmuls); a loop whose bound is data (a
  lax.while_loop that stops at end tokens) gets `dynamic_trips`;
- matmul FLOPs from the shapes of each dot, convolution (how the TPU compiler writes
  matmuls) and cuBLAS call (the GPU compiler's): 2 per multiply-add, times the product of
  the trip counts of the loops around it;
- the TPU compiler's `estimated_cycles` of each scheduled instruction (its own per-operation
  estimate, written in the program's backend configs), summed once per loop trip and once
  per computation: their ratio scales the compiler's optimal_seconds to a whole run.
A conditional counts its costliest branch. Custom kernels (Pallas) count the FLOPs of
their cost estimate where they have one; one without is counted in `uncounted_kernels`.
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(ENTRY )?%?(?P<name>[^\s(]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(?P<name>[^\s=]+) = (?P<rest>.*)$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply)=%(?P<callee>[^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<list>[^}]*)\}")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_KERNEL_FLOPS = re.compile(r'"cost_estimate":\{[^}]*"flops":"?(\d+)')
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_SHAPE = re.compile(r"^[a-z]\w*\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result type, e.g. bf16[8,128]{1,0} or a tuple (...)
    op: str
    operands: list[str]
    text: str  # the whole line, for attributes


@dataclasses.dataclass
class LoopCost:
    flops: float  # matmul FLOPs, loops counted
    flops_once: float  # the same with every loop body counted once (as XLA's cost analysis does)
    cycles: float  # the compiler's estimated cycles, loops counted (0 without estimates: not the TPU compiler)
    cycles_once: float
    loops: list[tuple[int, bool]]  # (trips, known) of each while loop
    uncounted_kernels: int = 0  # custom kernels (Pallas) with no cost estimate: their FLOPs are not in `flops`

    @property
    def cycle_scale(self) -> float:
        """How many times the program's estimated work exceeds its loops-counted-once work."""
        return self.cycles / self.cycles_once if self.cycles_once else float("nan")

    @property
    def dynamic_loops(self) -> int:
        return sum(not known for _, known in self.loops)


def _split_type(rest: str) -> tuple[str, str]:
    """("(s32[], bf16[4])" or "bf16[4]{0}", the text after it) of an instruction's right-hand side."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _operands(call: str) -> list[str]:
    """The %names inside the op's parentheses (the first balanced group)."""
    depth, end = 0, len(call)
    for i, ch in enumerate(call):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch == ")":
            end = i
            break
    return re.findall(r"%([^\s,)]+)", call[:end])


def _joined_lines(text: str):
    """The lines of HLO text, an instruction whose attributes span several lines (a kernel's
    metadata) joined into one."""
    pending = ""
    for line in text.splitlines():
        starts = _HEADER.match(line) or _INSTRUCTION.match(line) or line == "}" or not line.strip()
        if starts or not pending:
            if pending:
                yield pending
            pending = line
        else:
            pending += line
    if pending:
        yield pending


def parse(text: str) -> tuple[dict[str, dict[str, Instruction]], str]:
    """{computation: {instruction name: Instruction}} of HLO text, and the entry's name."""
    computations: dict[str, dict[str, Instruction]] = {}
    entry, current = "", None
    for line in _joined_lines(text):
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header["name"], {})
            if header.group(1):
                entry = header["name"]
            continue
        if line == "}":  # the computation's end (a continued attribute may start with "}}")
            current = None
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if match:
            shape, tail = _split_type(match["rest"])
            op, _, call = tail.partition("(")
            current[match["name"]] = Instruction(match["name"], shape, op, _operands("(" + call), line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _dims(shape: str) -> list[int]:
    match = _SHAPE.match(shape)
    if not match:
        return []
    return [int(d) for d in match["dims"].split(",") if d]


def matmul_flops(instruction: Instruction, computation: dict[str, Instruction]) -> float:
    """2 x output elements x the multiply-adds per output element of a dot or a convolution."""
    out = math.prod(_dims(instruction.shape))
    if instruction.op == "dot":
        lhs = _dims(computation[instruction.operands[0]].shape)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.text)
        dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
        return 2.0 * out * math.prod(lhs[d] for d in dims)
    if instruction.op == "convolution":
        # Each output element reads the kernel's input features at each window position that
        # falls on an input element. The TPU compiler writes matmuls as convolutions whose
        # windows mostly fall on padding or dilation holes: a window of w positions over an
        # input of n elements dilated by d (holes of d - 1 zeros) hits at most ceil(w / d) and
        # at most n of them.
        lhs = _dims(computation[instruction.operands[0]].shape)
        kernel = _dims(computation[instruction.operands[1]].shape)
        lhs_labels, kernel_labels = re.search(r"dim_labels=(\w+)_(\w+)->", instruction.text).groups()
        window = re.search(r"window=\{size=([\dx]+)", instruction.text)
        dilation = re.search(r"lhs_dilate=([\dx]+)", instruction.text)
        sizes = [int(n) for n in window.group(1).split("x")] if window else []
        dilations = [int(n) for n in dilation.group(1).split("x")] if dilation else [1] * len(sizes)
        inputs = [lhs[lhs_labels.index(str(k))] for k in range(len(sizes))]
        positions = math.prod(min(-(-w // d), n) for w, d, n in zip(sizes, dilations, inputs))
        return 2.0 * out * kernel[kernel_labels.index("i")] * positions
    if instruction.op == "custom-call":
        gemm = _GEMM_CONTRACTING.search(instruction.text)
        if gemm:  # a cuBLAS matmul (XLA's GPU compiler): its result is the first of (result, workspace)
            result = math.prod(_dims(instruction.shape.lstrip("(")))
            lhs = _dims(computation[instruction.operands[0]].shape)
            return 2.0 * result * math.prod(lhs[int(d)] for d in re.findall(r"\d+", gemm.group(1)))
        estimate = _KERNEL_FLOPS.search(instruction.text)
        return float(estimate.group(1)) if estimate else 0.0
    return 0.0


def trip_count(loop: Instruction, caller: dict[str, Instruction], computations) -> int | None:
    """A while loop's trip count when the program states it: `known_trip_count`, or a
    condition `counter < N` (N a constant) on a counter that starts at a constant."""
    known = _KNOWN_TRIPS.search(loop.text)
    if known:
        return int(known.group(1))
    condition = computations[re.search(r"condition=%([^\s,]+)", loop.text).group(1)]
    root = next((i for i in condition.values() if i.text.lstrip().startswith("ROOT")), None)
    if root is None or root.op != "compare" or "direction=LT" not in root.text or len(root.operands) != 2:
        return None
    counter, bound = (condition.get(name) for name in root.operands)
    bound_value = _constant(bound, condition)
    if counter is None or counter.op != "get-tuple-element" or bound_value is None:
        return None
    index = int(re.search(r"index=(\d+)", counter.text).group(1))
    init = caller.get(loop.operands[0])
    if init is None or init.op != "tuple":
        return None
    start = _constant(caller.get(init.operands[index]), caller)
    if start is None:
        return None
    body = computations[re.search(r"body=%([^\s,]+)", loop.text).group(1)]
    step = _counter_step(body, index)
    return max(-(-(bound_value - start) // step), 0)


def _counter_step(body: dict[str, Instruction], index: int) -> int:
    """What a loop body adds to its counter (tuple element `index`): 1 for lax.scan, 2 where
    the SPMD partitioner's windowed matmuls take two shards per trip; 1 when not stated."""
    root = next((i for i in body.values() if i.text.lstrip().startswith("ROOT")), None)
    if root is None or root.op != "tuple" or index >= len(root.operands):
        return 1
    update = body.get(root.operands[index])
    if update is None or update.op != "add":
        return 1
    steps = [_constant(body.get(name), body) for name in update.operands]
    return next((step for step in steps if step and step > 0), 1)


def _constant(instruction: Instruction | None, computation: dict[str, Instruction]) -> int | None:
    """The integer value of a scalar constant (or a copy of one)."""
    while instruction is not None and instruction.op == "copy":
        instruction = computation.get(instruction.operands[0])
    if instruction is None or instruction.op != "constant":
        return None
    value = re.search(r"constant\((-?\d+)\)", instruction.text)
    return int(value.group(1)) if value else None


def loop_cost(text: str, dynamic_trips: int = 1) -> LoopCost:
    """The program's matmul FLOPs and estimated cycles with its loops counted (see the module
    docstring); `dynamic_trips`: the trip count of a loop whose bound is data."""
    computations, entry = parse(text)
    loops: list[tuple[int, bool]] = []
    uncounted = [0]

    def visit(name: str, scheduled: bool) -> list[float]:
        """[flops, flops once, cycles, cycles once] of one run of a computation. `scheduled`: a
        computation the program runs instruction by instruction (the entry, loop bodies, called
        computations), whose instructions carry the cycle estimates; not the inside of a
        fusion, which its fusion instruction's estimate covers."""
        computation, total = computations[name], [0.0, 0.0, 0.0, 0.0]

        def add(part: list[float], times: float = 1.0):
            total[0] += times * part[0]
            total[1] += part[1]
            total[2] += times * part[2]
            total[3] += part[3]

        for instruction in computation.values():
            flops = matmul_flops(instruction, computation)
            cycles = _CYCLES.search(instruction.text) if scheduled else None
            cycles = int(cycles.group(1)) if cycles else 0
            add([flops, flops, cycles, cycles])
            if instruction.op == "custom-call" and "tpu_custom_call" in instruction.text and not flops:
                uncounted[0] += 1
            if instruction.op == "while":
                trips = trip_count(instruction, computation, computations)
                loops.append((dynamic_trips if trips is None else trips, trips is not None))
                trips = dynamic_trips if trips is None else trips
                add(visit(re.search(r"body=%([^\s,]+)", instruction.text).group(1), True), trips)
                add(visit(re.search(r"condition=%([^\s,]+)", instruction.text).group(1), True), trips + 1)
                continue
            branches = _BRANCHES.search(instruction.text)
            if branches:  # one branch runs: the costliest counts
                costs = [visit(b, True) for b in re.findall(r"%([^\s,]+)", branches["list"])]
                add([max(c[k] for c in costs) for k in range(4)])
            for kind, callee in ((m.group(1), m["callee"]) for m in _CALLEE.finditer(instruction.text)):
                if kind == "calls" and instruction.op == "fusion":
                    add(visit(callee, False))
                elif kind in ("calls", "to_apply") and instruction.op in ("call", "async-start", "custom-call"):
                    add(visit(callee, scheduled))
                # to_apply of a reduce, map, sort or scatter: a scalar function, no matmuls.
        return total

    flops, flops_once, cycles, cycles_once = visit(entry, True)
    return LoopCost(flops, flops_once, cycles, cycles_once, loops, uncounted[0])
