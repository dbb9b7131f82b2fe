"""Plans: a sequence of allow-listed operations a client recorded once and runs often.

A client records a function of pointers (a training step, a whole local round)
the first time it runs it, operation by operation; it then sends the worker the
operations it saw (`define_plan`), and from then on runs the function as one
`run_plan` command instead of one command per operation. This is not client
code: a plan is data, a list of the same `call`s the client would have sent,
each checked against the allow-list when the plan is defined and run with the
same argument and result checks as a `call` of its own. What a plan adds is only
that its intermediate results stay inside the run instead of being stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchrelay.broker import (
    Call,
    DefinePlan,
    OperationRefused,
    ProtocolError,
    resolve_op,
)

__all__ = ["RecordedPlan", "check_plan"]


@dataclass(frozen=True, slots=True)
class RecordedPlan:
    """A checked plan: run `calls` with `parameters` bound, keep `returns`."""

    parameters: tuple[int, ...]
    calls: tuple[Call, ...]
    returns: tuple[int, ...]
    ops: tuple[Any, ...] = field(init=False, repr=False, compare=False)
    """Each call's operation, looked up once (a plan runs hundreds of them per run)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(resolve_op(call.op) for call in self.calls))

    def __repr__(self) -> str:
        ops = sorted({call.op for call in self.calls})
        shown = ", ".join(ops[:6]) + (", ..." if len(ops) > 6 else "")
        return (f"<Plan of {len(self.calls)} operations ({shown}), {len(self.parameters)} "
                f"parameters, {len(self.returns)} results>")


def check_plan(command: DefinePlan) -> RecordedPlan:
    """The plan `command` defines, once every part of it is known to be allowed;
    `OperationRefused` or `ProtocolError` names what is not."""
    calls = command.call_commands()
    parameters = tuple(command.parameters)
    if len(set(parameters)) != len(parameters):
        raise ProtocolError("define_plan: a parameter is named twice")
    made: set[int] = set()
    for number, call in enumerate(calls):
        resolve_op(call.op)  # refused unless allow-listed
        if "out" in call.kwargs:
            raise OperationRefused(f"plan call {number}: {call.op} with out= is refused")
        if call.hops:
            raise ProtocolError(f"plan call {number}: a plan runs where its data is (hops "
                                "must be 0)")
        if call.fetch:
            raise ProtocolError(f"plan call {number}: a plan's calls fetch nothing (what it "
                                "returns is fetched afterwards)")
        if call.result_id is not None:
            if call.result_id in made or call.result_id in parameters:
                raise ProtocolError(f"plan call {number}: result {call.result_id} is made twice")
            made.add(call.result_id)
    for value in command.returns:
        if value not in made and value not in parameters:
            raise ProtocolError(f"define_plan: it returns {value}, which none of its calls "
                                "makes")
    return RecordedPlan(parameters, tuple(calls), tuple(command.returns))

