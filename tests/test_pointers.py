"""Pointers: send, get, operations, chains, move — on both brokers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchrelay as tr
from torchrelay.client import send

tr.hook(torch)


@pytest.mark.parametrize(
    "value",
    [
        torch.tensor([1, 2, 3, 4]),
        torch.tensor(3.5),
        torch.zeros(0, 3),
        torch.arange(12, dtype=torch.float64).reshape(3, 4).t(),  # not contiguous
        torch.tensor([True, False]),
        torch.randn(2, 3).to(torch.bfloat16),
        torch.randn(4, dtype=torch.complex64),
        torch.tensor([-1, 0, 1], dtype=torch.int8),
    ],
    ids=["int64", "scalar", "empty", "transposed", "bool", "bfloat16", "complex", "int8"],
)
def test_send_then_get_returns_an_equal_tensor(bob: tr.WorkerHandle, value: torch.Tensor) -> None:
    pointer = value.send(bob)
    assert isinstance(pointer, tr.PointerTensor)
    assert pointer.location is bob
    assert pointer.id_at_location in bob._objects

    back = pointer.get()

    assert back.dtype == value.dtype
    assert back.shape == value.shape
    assert torch.equal(back, value)
    assert pointer.id_at_location not in bob._objects


def test_requires_grad_survives_the_trip(bob: tr.WorkerHandle) -> None:
    back = torch.ones(3, requires_grad=True).send(bob).get()
    assert back.requires_grad


def test_pointer_repr_names_owner_location_and_ids(bob: tr.WorkerHandle) -> None:
    pointer = torch.tensor([1]).send(bob)
    assert repr(pointer) == f"[PointerTensor | me:{pointer.id} -> bob:{pointer.id_at_location}]"
    assert pointer.id != pointer.id_at_location
    pointer.get()


def test_operators_run_remotely_and_return_pointers(bob: tr.WorkerHandle) -> None:
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    pa, pb = a.send(bob), b.send(bob)

    results = {
        "add": (pa + pb, a + b), "sub": (pa - pb, a - b), "mul": (pa * pb, a * b),
        "div": (pa / pb, a / b), "pow": (pa**2, a**2), "neg": (-pa, -a),
        "radd": (1 + pa, 1 + a), "rsub": (10 - pa, 10 - a), "rtruediv": (1 / pa, 1 / a),
        "matmul": (pa @ pb, a @ b), "lt": (pa < pb, a < b), "eq": (pa == pb, a == b),
        "abs": (abs(-pa), abs(-a)),
    }

    for name, (pointer, expected) in results.items():
        assert isinstance(pointer, tr.PointerTensor), name
        assert torch.equal(pointer.get(), expected), name
    pa.get(), pb.get()


def test_torch_functions_and_methods_dispatch_to_the_worker(bob: tr.WorkerHandle) -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    px = x.send(bob)

    assert torch.equal(torch.add(px, px).get(), x + x)
    assert torch.equal(F.relu(px).get(), F.relu(x))
    assert torch.equal(torch.cat([px, px], dim=0).get(), torch.cat([x, x]))
    assert torch.equal(px.sum(dim=1).get(), x.sum(dim=1))
    assert torch.equal(px.t().get(), x.t())
    assert torch.allclose(torch.linalg.norm(px).get(), torch.linalg.norm(x))
    assert px.sum().item().get() == pytest.approx(-2.0)
    px.get()


def test_local_tensors_and_scalars_travel_inline_as_arguments(bob: tr.WorkerHandle) -> None:
    px = torch.tensor([1.0, 2.0]).send(bob)
    result = (px + torch.tensor([10.0, 20.0])) * 2
    assert torch.equal(result.get(), torch.tensor([22.0, 44.0]))
    assert torch.equal((torch.tensor([1.0, 1.0]) - px).get(), torch.tensor([0.0, -1.0]))
    px.get()


def test_in_place_operations_modify_the_remote_tensor(bob: tr.WorkerHandle) -> None:
    px = torch.tensor([1.0, 2.0]).send(bob)
    same = px.add_(1)
    px *= 3
    px[0] = 100.0
    assert same is px
    assert torch.equal(px.get(), torch.tensor([100.0, 9.0]))


def test_indexing_and_tuple_results(bob: tr.WorkerHandle) -> None:
    x = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    px = x.send(bob)
    assert torch.equal(px[1].get(), x[1])
    assert torch.equal(px[:, 1:].get(), x[:, 1:])
    assert torch.equal(px[..., 0].get(), x[..., 0])
    top = px.max(dim=1)  # a (values, indices) tuple, kept remotely as one object
    values, indices = top[0], top[1]
    assert torch.equal(values.get(), x.max(dim=1).values)
    assert torch.equal(indices.get(), x.max(dim=1).indices)
    assert px.shape == torch.Size([2, 2])
    px.get()


def test_autograd_runs_on_the_worker(bob: tr.WorkerHandle) -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True).send(bob)
    loss = (w * w).sum()
    loss.backward()
    assert torch.equal(w.grad.get(), torch.tensor([2.0, 4.0]))
    loss.get()
    w.get()


def test_pointer_to_pointer_keeps_the_data_where_it_was(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    x_ptr = torch.tensor([1, 2, 3]).send(bob)
    to_ptr = x_ptr.send(alice)

    assert to_ptr.location is alice and to_ptr.id_at_location == x_ptr.id
    assert bob._objects == {x_ptr.id_at_location: "tensor([1, 2, 3])"}
    assert alice._objects == {
        x_ptr.id: f"[PointerTensor | alice:{x_ptr.id} -> bob:{x_ptr.id_at_location}]"
    }
    back = to_ptr.get()
    assert repr(back) == f"[PointerTensor | me:{x_ptr.id} -> bob:{x_ptr.id_at_location}]"
    assert torch.equal(back.get(), torch.tensor([1, 2, 3]))


def test_operations_on_a_chain_of_three_leave_results_at_every_hop(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle, carol: tr.WorkerHandle
) -> None:
    chain = torch.tensor([1.0, 2.0]).send(bob).send(alice).send(carol)

    doubled = chain * 2

    assert len(carol._objects) == 2 and len(alice._objects) == 2 and len(bob._objects) == 2
    on_alice = doubled.get()
    on_bob = on_alice.get()
    assert on_alice.location is alice and on_bob.location is bob
    assert torch.equal(on_bob.get(), torch.tensor([2.0, 4.0]))
    assert torch.equal(chain.get().get().get(), torch.tensor([1.0, 2.0]))


def test_a_cycle_alice_bob_alice_does_not_deadlock(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    cycle = torch.tensor([5.0]).send(alice).send(bob).send(alice)

    result = cycle + cycle

    assert torch.equal(result.get().get().get(), torch.tensor([10.0]))
    assert torch.equal(cycle.get().get().get(), torch.tensor([5.0]))


def test_move_sends_data_from_worker_to_worker(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
    old_id = x.id_at_location

    moved = x.move(alice)

    assert old_id not in bob._objects
    assert alice._objects == {moved.id_at_location: "tensor([1, 2, 3, 4, 5])"}
    assert repr(moved) == f"[PointerTensor | me:{moved.id} -> alice:{moved.id_at_location}]"
    assert torch.equal(moved.get(), torch.tensor([1, 2, 3, 4, 5]))


def test_move_of_a_pointer_moves_the_pointer_not_the_data(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle, carol: tr.WorkerHandle
) -> None:
    data_ptr = torch.tensor([7]).send(bob)
    chain = data_ptr.send(alice)

    moved = chain.move(carol)

    assert not alice._objects.keys() & {chain.id_at_location}
    assert list(bob._objects) == [data_ptr.id_at_location]
    assert torch.equal(moved.get().get(), torch.tensor([7]))


def test_a_moved_pointer_can_be_sent_on_to_its_own_worker(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    moved = torch.tensor([9]).send(bob).move(alice)
    chain = moved.send(alice)  # alice stores a pointer next to the data: distinct ids
    assert torch.equal(chain.get().get(), torch.tensor([9]))


def test_move_to_the_same_worker_is_a_no_op(bob: tr.WorkerHandle) -> None:
    x = torch.tensor([1]).send(bob)
    assert x.move(bob) is x
    x.get()


def test_remote_get_pulls_the_data_to_the_middle_of_the_chain(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    x_ptr = torch.tensor([1, 2]).send(bob)
    chain = x_ptr.send(alice)

    assert chain.remote_get() is chain

    assert x_ptr.id_at_location not in bob._objects
    assert alice._objects == {chain.id_at_location: "tensor([1, 2])"}
    assert torch.equal(chain.get(), torch.tensor([1, 2]))


def test_remote_send_moves_the_data_on_and_leaves_a_pointer(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    x = torch.tensor([3, 4]).send(bob)

    assert x.remote_send(alice) is x

    (alice_id, description), = alice._objects.items()
    assert description == "tensor([3, 4])"
    assert bob._objects == {
        x.id_at_location: f"[PointerTensor | bob:{x.id_at_location} -> alice:{alice_id}]"
    }
    assert torch.equal(x.get().get(), torch.tensor([3, 4]))


def test_pipelined_operations_are_all_visible_to_the_next_wait(
    bob: tr.WorkerHandle, alice: tr.WorkerHandle
) -> None:
    chain = torch.tensor([0.0]).send(bob).send(alice)
    for _ in range(50):
        chain += 1
    # Every increment was forwarded by alice to bob; bob must show them all.
    (description,) = bob._objects.values()
    assert description == "tensor([50.])"
    assert torch.equal(chain.get().get(), torch.tensor([50.0]))


def test_synchronous_mode_waits_for_each_operation(broker_url: str | None) -> None:
    with tr.connect(broker_url, pipelined=False) as fleet:
        bob = fleet.worker("bob")
        x = torch.tensor([1.0]).send(bob)
        with pytest.raises(tr.RemoteError, match="shape"):
            x.view(2, 2)  # raises right here, not at the next wait
        x.get()


def test_send_accepts_plain_values_too(bob: tr.WorkerHandle) -> None:
    pointer = send((1, 2.5, "three", [torch.tensor([4])]), bob)
    value = pointer.get()
    assert value[:3] == (1, 2.5, "three")
    assert torch.equal(value[3][0], torch.tensor([4]))


def test_hook_is_idempotent() -> None:
    tr.hook(torch)
    tr.hook(torch)
    assert callable(torch.Tensor.send)  # type: ignore[attr-defined]
