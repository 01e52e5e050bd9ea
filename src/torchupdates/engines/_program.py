"""A recorded chain of formulas as a straight-line program of single-tensor torch calls.

The foreach engine on CPU records a batch's formulas once (:class:`~torchupdates.formula.Graph`)
and runs the record over many chunks of a few hundred thousand elements, each small enough
that its operands stay in cache. :func:`compile_program` turns the record into a Python
function of *registers* (once per wiring of the record: later steps reuse it with their own
scalars): equally long 1-D tensors, one per leaf (the parameter, the gradient,
each state entry) and a few scratch buffers. Every operation writes its result with ``out=``
into a register whose value is no longer read, so a chunk allocates nothing:

* an output (the new parameter or a state entry) goes straight into its target's register
  when that target's old value has been read for the last time, else into scratch and is
  copied there at the end;
* an intermediate goes into a target's register when the target's old value is dead and the
  intermediate dies before the target's output is computed, else into a free scratch
  register (new scratch registers are added only when none is free).

Each recorded operation stays one call of the elementwise torch function with the same
operands in the same order (``out=`` may alias an operand exactly, which elementwise kernels
allow), so every element is the same single IEEE operation as in the other engines; with
``fuse``, a sum or difference and the product or quotient only it reads are one ``addcdiv``
call that rounds each of them alike (:mod:`._fusion`). Square
roots are correctly rounded (:mod:`torchupdates.formula._sqrt`), in one of three ways chosen per
program: torch's own (``"native"``: float64, and 16-bit types verified exact), through a
float64 register rounded once (``"wide"``), or NumPy's IEEE float32 root (``"numpy"``, which
falls back to the float64 register for a chunk with a negative input).
"""

from __future__ import annotations

import functools
import keyword
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..formula import ELEMENTWISE, Graph, Node, Scalar, Symbol, numpy_sqrt
from ._fusion import Instruction, Place, instructions

__all__ = ["SQRT_MODES", "Program", "compile_program"]

SQRT_MODES = ("native", "wide", "numpy")

_NEVER = 1 << 62  # "read until the end": the last read of a kept value


@dataclass(frozen=True)
class Program:
    """A compiled chain: ``run(*registers, *constants)`` computes one chunk in place.

    Registers are ``leaves`` (in the order given to :func:`compile_program`), then
    ``scratch`` scratch registers of the working dtype, then one float64 register when
    ``wide`` (for square roots, as long as the others), then the constants, then, when
    ``one``, a 0-d tensor 1 of the working dtype. The constants at positions ``numbers`` must
    be Python numbers (``addcdiv``'s ``value``, already rounded to the working dtype), the
    others may be numbers or 0-d tensors. ``outputs`` lists the leaf positions whose registers
    hold a new value at the end (the others are unchanged); ``reads`` the leaf positions read.
    """

    run: Callable[..., None]
    scratch: int
    wide: bool
    numpy: bool  # calls NumPy's square root (single-threaded, and it releases the GIL)
    constants: tuple[Scalar, ...]
    numbers: tuple[int, ...]
    one: bool
    outputs: tuple[int, ...]
    reads: tuple[int, ...]
    source: str


def compile_program(
    graph: Graph,
    leaves: Sequence[Symbol],
    writable: Sequence[bool],
    outputs: Sequence[tuple[Symbol, int]],
    sqrt: str,
    fuse: bool = False,
) -> Program:
    """Allocate registers for ``graph`` and generate its program.

    ``leaves`` are the graph's leaves in register order; ``writable[i]`` says whether leaf
    ``i``'s register may be overwritten (a target being replaced; gradients are not).
    ``outputs`` pairs each result node with the position of the leaf it replaces, which must
    be writable. ``sqrt``: how square roots are taken, one of :data:`SQRT_MODES`. ``fuse``:
    whether ``addcdiv`` calls may stand for several operations (only where
    :func:`~._fusion.addcdiv_rounds_each_operation` holds for the registers' dtype).
    """
    if sqrt not in SQRT_MODES:
        raise ValueError(f"sqrt must be one of {SQRT_MODES}, got {sqrt!r}")
    if sqrt == "numpy" and numpy_sqrt() is None:
        raise ValueError("NumPy's square root is not available or not exact here")
    # A step records its chain again with this step's scalars (a learning rate, a bias
    # correction): the same program serves every step, with the new scalars as its constants.
    key = (
        graph.wiring(),
        tuple(leaf.node.index for leaf in leaves),
        tuple(writable),
        tuple((value.node.index, position) for value, position in outputs),
        sqrt,
        fuse,
    )
    program = _PROGRAMS.get(key)
    if program is None:
        program = _Allocator(graph, leaves, writable, outputs, sqrt, fuse).program()
        if len(_PROGRAMS) >= _KEPT_PROGRAMS:
            _PROGRAMS.clear()  # one atomic step, whatever other threads do meanwhile
        _PROGRAMS[key] = program
    return replace(program, constants=graph.scalars())


_KEPT_PROGRAMS = 256
_PROGRAMS: dict[Hashable, Program] = {}
"""Programs by the wiring of their recording (at most :data:`_KEPT_PROGRAMS`, then emptied)."""


class _Allocator:
    def __init__(
        self,
        graph: Graph,
        leaves: Sequence[Symbol],
        writable: Sequence[bool],
        outputs: Sequence[tuple[Symbol, int]],
        sqrt: str,
        fuse: bool,
    ) -> None:
        self.leaves = [leaf.node for leaf in leaves]
        self.sqrt = sqrt
        self.instructions = instructions(graph, (value.node.index for value, _ in outputs), fuse)
        self.graph_leaves = [node.index for node in graph.nodes if node.op == "leaf"]
        self.last_read = [-1] * len(graph.nodes)
        for instruction in self.instructions:
            for arg in instruction.args:
                if isinstance(arg, Node):
                    self.last_read[arg.index] = instruction.index
        self.output_of: dict[int, int] = {}  # target register -> result node index
        for value, position in outputs:
            node = value.node
            if not writable[position]:
                raise ValueError(f"leaf {position} receives an output but is not writable")
            if position in self.output_of:
                raise ValueError(f"leaf {position} receives two outputs")
            self.output_of[position] = node.index
            self.last_read[node.index] = _NEVER
        # A target without an output keeps its value: its register is never written.
        self.writable = [w and i in self.output_of for i, w in enumerate(writable)]
        self.reg_of: dict[int, int] = {leaf.index: i for i, leaf in enumerate(self.leaves)}
        self.holds: list[int | None] = [leaf.index for leaf in self.leaves]  # node held by each register
        self.lines: list[str] = []
        self.scalars = graph.scalars()
        places = [
            (node.index, i) for node in graph.nodes for i, arg in enumerate(node.args) if not isinstance(arg, Node)
        ]
        order = {place: k for k, place in enumerate(places)}  # the order of graph.scalars()
        self.scalar_names = {place: f"c{k}" for place, k in order.items()}
        self.numbers = tuple(
            sorted(order[i.value] for i in self.instructions if i.op == "addcdiv" and i.value is not None)
        )
        self.one = any(i.op == "addcdiv" and i.args[2] is None for i in self.instructions)
        # A leaf's register is called by the leaf's name where that is a plain identifier
        # taken by nothing else in the program; scratch registers are r<position>.
        reserved = {*ELEMENTWISE, "sqrt", "npsqrt", "addcdiv", "program", "w", "one"}
        names = [leaf.name for leaf in self.leaves]
        self.leaf_names = [
            name
            if name is not None
            and name.isidentifier()
            and not keyword.iskeyword(name)
            and name not in reserved
            and not re.fullmatch(r"[rc]\d+", name)
            and names.count(name) == 1
            else f"r{i}"
            for i, name in enumerate(names)
        ]

    # -- allocation ---------------------------------------------------------------------

    def _free(self, reg: int, now: int) -> bool:
        held = self.holds[reg]
        return held is None or self.last_read[held] <= now

    def _scratch(self, now: int, avoid: set[int]) -> int:
        for reg in range(len(self.leaves), len(self.holds)):
            if reg not in avoid and self._free(reg, now):
                return reg
        self.holds.append(None)
        return len(self.holds) - 1

    def _destination(self, node: Instruction) -> int:
        now = node.index
        # NumPy's root may have to be redone from its input: never in place.
        operand = node.args[0]
        avoid = set()
        if node.op == "sqrt" and self.sqrt == "numpy" and isinstance(operand, Node):
            avoid.add(self.reg_of[operand.index])
        targets = [reg for reg, result in self.output_of.items() if result == now]
        for reg in targets:
            if reg not in avoid and self._free(reg, now):
                return reg
        if not targets:
            # An intermediate may borrow a target's register until that target's output.
            for reg, result in self.output_of.items():
                if (
                    result > now
                    and reg not in avoid
                    and self.writable[reg]
                    and self._free(reg, now)
                    and self.last_read[now] <= result
                ):
                    return reg
        return self._scratch(now, avoid)

    # -- code ----------------------------------------------------------------------------

    def _name(self, reg: int) -> str:
        return self.leaf_names[reg] if reg < len(self.leaf_names) else f"r{reg}"

    def _operand(self, arg: Node | Place | None) -> str:
        if isinstance(arg, Node):
            return self._name(self.reg_of[arg.index])
        return "one" if arg is None else self.scalar_names[arg]

    def _emit(self, node: Instruction) -> None:
        operands = [self._operand(arg) for arg in node.args]
        out = self._destination(node)
        self.reg_of[node.index] = out
        self.holds[out] = node.index
        if node.op == "addcdiv":
            value = "1" if node.value is None else self.scalar_names[node.value]
            sign = "-" if node.negate else ""
            self.lines.append(f"addcdiv({', '.join(operands)}, value={sign}{value}, out={self._name(out)})")
        elif node.op == "sqrt" and self.sqrt == "wide":
            # Correctly rounded: the float64 root of a float32/16 value rounds once to the
            # nearest float32/16 (see formula/_sqrt.py); "w" is the float64 register.
            self.lines.append(f"w.copy_({operands[0]}); sqrt(w, out=w); {self._name(out)}.copy_(w)")
        elif node.op == "sqrt" and self.sqrt == "numpy":
            self.lines.append(f"npsqrt({operands[0]}, {self._name(out)}, w)")
        else:
            self.lines.append(f"{node.op}({', '.join(operands)}, out={self._name(out)})")

    def program(self) -> Program:
        if any(index not in self.reg_of for index in self.graph_leaves):
            raise ValueError("the graph has a leaf that was not given as a register")
        for instruction in self.instructions:
            self._emit(instruction)
        self._final_copies()
        scratch = len(self.holds) - len(self.leaves)
        wide = self.sqrt != "native" and any(i.op == "sqrt" for i in self.instructions)
        names = [self._name(i) for i in range(len(self.holds))] + (["w"] if wide else [])
        names += [f"c{i}" for i in range(len(self.scalars))] + (["one"] if self.one else [])
        body = [f"    {line}" for line in self.lines] or ["    pass"]
        source = "\n".join([f"def program({', '.join(names)}):", *body]) + "\n"
        reads = tuple(i for i, leaf in enumerate(self.leaves) if self.last_read[leaf.index] >= 0)
        return Program(
            run=_compiled(source),
            scratch=scratch,
            wide=wide,
            numpy=wide and self.sqrt == "numpy",
            constants=self.scalars,
            numbers=self.numbers,
            one=self.one,
            outputs=tuple(sorted(self.output_of)),
            reads=reads,
            source=source,
        )

    def _final_copies(self) -> None:
        """Copy each output not computed in its target's register into it."""
        copies = [(self.reg_of[result], target) for target, result in self.output_of.items()]
        copies = [(source, target) for source, target in copies if source != target]
        overwritten = {target for _, target in copies}
        staged = []
        for source, target in copies:
            if source in overwritten:
                # The source is a target that is itself overwritten below (a leaf passed
                # through to another target): read it into scratch first.
                spare = self._scratch(_NEVER - 1, set())  # kept values (read "until _NEVER") stay
                self.holds[spare] = self.output_of[target]
                self.lines.append(f"{self._name(spare)}.copy_({self._name(source)})")
                source = spare
            staged.append((source, target))
        self.lines += [f"{self._name(target)}.copy_({self._name(source)})" for source, target in staged]


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Callable[..., None]:
    namespace: dict[str, Any] = dict(ELEMENTWISE)
    namespace["sqrt"] = torch.sqrt
    namespace["npsqrt"] = numpy_sqrt()
    namespace["addcdiv"] = torch.addcdiv
    exec(compile(source, f"<torchupdates program {hash(source) & 0xFFFFFFFF:08x}>", "exec"), namespace)
    run: Callable[..., None] = namespace["program"]
    return run
