"""`tr.plan`: a function of pointers recorded once, then run as one command, on both brokers;
and what a worker does with a plan nobody recorded honestly."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder
from torch import nn

import torchrelay as tr
from torchrelay.broker import MAX_PLAN_CALLS, DefinePlan, ObjectRef, RunPlan
from torchrelay.worker import WorkerProcesses

tr.hook(torch)


def _sends(recorder: Recorder) -> list[str]:
    return [e for e in recorder.events if e.startswith("send")]


def test_a_step_recorded_once_then_runs_as_one_command_and_trains_as_locally(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    local = copy.deepcopy(model)
    remote = model.copy().send(bob)
    optimizer = torch.optim.SGD(remote.parameters(), lr=0.1, momentum=0.9)
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)

    @tr.plan
    def step(data: Any, target: Any) -> Any:
        optimizer.zero_grad()
        loss = F.mse_loss(remote(data), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    inputs = [torch.randn(4, 3) for _ in range(5)]
    targets = [torch.randn(4, 1) for _ in range(5)]
    data = [x.send(bob) for x in inputs]  # pointers; the targets go along with each run
    fleet.sync()
    losses = [step(data[0], targets[0])]
    assert step.recorded == {"bob": "as a plan of 6 operations"}
    fleet.sync()
    recorder.clear()
    losses += [step(x, y) for x, y in zip(data[1:], targets[1:], strict=True)]
    fleet.sync()
    assert _sends(recorder) == ["send run_plan to bob"] * 4

    expected = []
    for x, y in zip(inputs, targets, strict=True):
        local_optimizer.zero_grad()
        loss = F.mse_loss(local(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        local_optimizer.step()
        expected.append(loss.detach())
    torch.testing.assert_close([loss.get() for loss in losses], expected)
    trained = remote.get()
    torch.testing.assert_close(trained.weight, local.weight)
    torch.testing.assert_close(trained.bias, local.bias)


def test_what_a_plan_computed_from_shapes_is_recorded_per_shape(
    fleet: tr.Fleet, bob: tr.WorkerHandle, recorder: Recorder
) -> None:
    @tr.plan
    def scaled_sum(x: Any) -> Any:
        return x.sum() * len(x)  # len(x) is fixed in what is recorded

    four, three = torch.ones(4).send(bob), torch.ones(3).send(bob)
    results = [scaled_sum(four), scaled_sum(four), scaled_sum(three), scaled_sum(three),
               scaled_sum(four)]
    assert [r.get().item() for r in results] == [16, 16, 9, 9, 16]
    assert recorder.events.count("send define_plan to bob") == 2
    assert recorder.events.count("send run_plan to bob") == 3


def test_what_cannot_be_a_plan_runs_op_by_op_and_says_why(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle, recorder: Recorder
) -> None:
    @tr.plan
    def peeks(x: Any) -> Any:
        return x + x.sum().get()  # a value comes back in the middle

    @tr.plan
    def wanders(x: Any) -> Any:
        return (x * 2).move(alice)

    x = torch.tensor([1.0, 2.0]).send(bob)
    assert [peeks(x).get().tolist() for _ in range(2)] == [[4.0, 5.0]] * 2
    assert peeks.recorded == {"bob": "op by op: it sent fetch, not an operation"}
    assert [wanders(x).get().tolist() for _ in range(2)] == [[2.0, 4.0]] * 2
    assert wanders.recorded["bob"].startswith("op by op: it sent transfer")
    assert "send define_plan to bob" not in recorder.events

    with pytest.raises(TypeError, match="needs at least one pointer argument"):
        peeks(torch.ones(2))

    @tr.plan
    def local_result(x: Any) -> Any:
        return 3

    with pytest.raises(TypeError, match="returns a pointer, a tuple of pointers, or None"):
        local_result(x)
    x.get()


def _call(op: str, args: list[Any], result_id: int | None = None, **fields: Any) -> dict[str, Any]:
    return {"op": op, "args": args, "kwargs": fields.pop("kwargs", {}), "result_id": result_id,
            "hops": fields.pop("hops", 0)}


@pytest.mark.parametrize(
    ("calls", "returns", "message"),
    [
        ([_call("builtins.eval", ["1"], 2)], [2], "'builtins.eval' is not on the allow-list"),
        ([_call("Tensor.add", [ObjectRef(1), 1], 2, hops=1)], [2], "hops must be 0"),
        ([{**_call("Tensor.add", [ObjectRef(1), 1], 2), "fetch": True}], [2],
         "a plan's calls fetch nothing"),
        ([_call("torch.add", [ObjectRef(1), 1], 2, kwargs={"out": ObjectRef(1)})], [2],
         "with out= is refused"),
        ([_call("Tensor.add", [ObjectRef(1), 1], 2)] * 2, [2], "result 2 is made twice"),
        ([_call("Tensor.add", [ObjectRef(1), 1], 2)], [99], "which none of its calls makes"),
        ([_call("Tensor.add", [ObjectRef(1), 1], 2)] * (MAX_PLAN_CALLS + 1), [],
         f"more than the {MAX_PLAN_CALLS} a plan may hold"),
        ([{"op": "Tensor.add", "args": [], "kwargs": {}, "result_id": 2, "guard": 3}], [],
         "call 0 carries envelope fields"),
        ([{"op": "Tensor.add", "args": 1, "kwargs": {}, "result_id": 2}], [],
         "call 0: call: field 'args' must be a list"),
    ],
)
def test_a_forged_plan_is_refused_naming_what_is_wrong(
    fleet: tr.Fleet, bob: tr.WorkerHandle, calls: list[dict[str, Any]], returns: list[int],
    message: str,
) -> None:
    with pytest.raises(tr.RemoteError, match=message):
        fleet.request("bob", DefinePlan(fleet.new_id(), [1], calls, returns))


def test_running_a_plan_wrongly_is_refused(
    fleet: tr.Fleet, bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    plan_id, x = fleet.new_id(), torch.ones(2).send(bob)
    fleet.request("bob", DefinePlan(plan_id, [1], [_call("Tensor.mul", [ObjectRef(1), 2], 2)],
                                    [2]))
    with pytest.raises(tr.RemoteError, match="is not a plan"):
        fleet.request("bob", RunPlan(x.id_at_location, [], []))
    with pytest.raises(tr.RemoteError, match="takes 1 arguments, not 2"):
        fleet.request("bob", RunPlan(plan_id, [1, 2], [fleet.new_id()]))
    with pytest.raises(tr.RemoteError, match="returns 1 results, not 0"):
        fleet.request("bob", RunPlan(plan_id, [ObjectRef(x.id_at_location)], []))
    far = torch.ones(2).send(alice).send(bob)  # on bob: a pointer to alice's tensor
    with pytest.raises(tr.RemoteError, match="a plan runs where all its data is"):
        fleet.request("bob", RunPlan(plan_id, [ObjectRef(far.id_at_location)],
                                     [fleet.new_id()]))
    result = fleet.new_id()
    fleet.request("bob", RunPlan(plan_id, [torch.tensor([1.0, 3.0])], [result]))
    assert tr.PointerTensor(bob, result).get().tolist() == [2.0, 6.0]
    assert bob.status()["id"] == "bob"  # the worker still answers
    fleet.post("bob", tr.broker.Delete([plan_id]))
    x.get(), far.get().get()


def test_a_plan_cannot_hold_more_than_the_memory_budget(vhost_factory: Any) -> None:
    url = vhost_factory()
    mib = 1 << 20
    with WorkerProcesses(url, ["tight"], extra_args=["--max-bytes", str(64 * mib)]), \
            tr.connect(url) as fleet:
        tight = fleet.worker("tight")
        calls = [_call("torch.ones", [4 * mib], 100 + i) for i in range(5)]  # 16 MiB each
        plan_id = fleet.new_id()
        fleet.request("tight", DefinePlan(plan_id, [], calls, [104]))
        with pytest.raises(tr.RemoteError, match=r"past its max_bytes.*at call 4"):
            fleet.request("tight", RunPlan(plan_id, [], [fleet.new_id()]))
        assert tight.status()["tensor_bytes"] == 0
        # Views take no memory of their own: five of a stored 40 MiB tensor, and of one
        # made in the plan, are within the budget (FedAvg returns views of a model).
        stored = torch.ones(10 * mib).send(tight)
        calls = [_call("Tensor.detach", [ObjectRef(1)], 100),
                 *[_call("Tensor.flatten", [ObjectRef(100 + i)], 101 + i) for i in range(4)],
                 _call("torch.ones", [4 * mib], 105),
                 *[_call("Tensor.view", [ObjectRef(105 + i), -1], 106 + i) for i in range(4)]]
        plan_id = fleet.new_id()
        fleet.request("tight", DefinePlan(plan_id, [1], calls, [104, 109]))
        views = [tr.PointerTensor(tight, fleet.new_id()) for _ in range(2)]
        fleet.request("tight", RunPlan(plan_id, [ObjectRef(stored.id_at_location)],
                                       [v.id_at_location for v in views]))
        assert views[0].get().shape == (10 * mib,)
        del stored, views
