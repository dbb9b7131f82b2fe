"""A command cannot end or freeze the worker: native crashes and overruns are contained
by the supervisor, the objects survive, and the command that did it never runs again."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pika
import pytest
import torch
from test_daemon import stall

import torchrelay as tr
from torchrelay.broker import decode_command
from torchrelay.worker import WorkerProcesses
from torchrelay.worker.containment import _mirror_codec as codec

tr.hook(torch)

MIB = 1 << 20


@pytest.fixture
def contained(vhost_factory: Any) -> Any:
    """A daemon `cora` of its own, with a short command_timeout and stop_grace."""
    url = vhost_factory()
    daemons = WorkerProcesses(url, ["cora"], extra_args=["--command-timeout", "4",
                                                        "--stop-grace", "2",
                                                        "--fault-injection"])
    with daemons, tr.connect(url, timeout=60) as fleet:
        yield daemons, fleet, fleet.worker("cora")


def executor_of(worker: tr.WorkerHandle) -> int:
    return int(worker.status()["executor_pid"])


def test_a_native_crash_fails_that_command_and_the_objects_survive(contained: Any) -> None:
    daemons, fleet, cora = contained
    small = torch.tensor([1.0, 2.0]).send(cora)
    small += 1  # changed in place: the change survives too
    big = torch.ones(4 * MIB).send(cora)  # 16 MiB: shared, not copied
    big *= 3
    leaf = torch.tensor([3.0], requires_grad=True).send(cora)
    loss = (leaf * leaf).sum()  # its graph lives in the executor
    pair = tr.client.send((1, "two"), cora)
    executor = executor_of(cora)

    stall(fleet, "cora", 3.0)  # well within command_timeout
    time.sleep(1.0)  # it is running now
    os.kill(executor, signal.SIGSEGV)  # as a crash inside torch would

    with pytest.raises(tr.RemoteError, match=r"crashed the worker's executor \(SIGSEGV\)"):
        fleet.sync()
    status = cora.status()
    assert status["executor_restarts"] == 1
    assert status["executor_pid"] != executor
    assert status["pid"] == daemons.processes["cora"].pid  # the daemon itself lives on
    assert torch.equal(small.get(), torch.tensor([2.0, 3.0]))
    assert big.sum().get().item() == 12 * MIB
    assert pair.get() == (1, "two")
    loss.backward()
    with pytest.raises(tr.RemoteError, match=r"autograd graph of object \d+ was lost"):
        fleet.sync()
    assert leaf.requires_grad
    assert torch.equal((leaf * 2).get(), torch.tensor([6.0]))  # the leaf is fine
    big.get(), leaf.get(), loss.get()
    assert "crashed the worker's executor (SIGSEGV)" in daemons.log_tail("cora")


def test_a_command_past_command_timeout_is_stopped_and_never_runs_again(
    contained: Any,
) -> None:
    daemons, fleet, cora = contained
    kept = torch.tensor([5.0]).send(cora)
    fleet.timeout = 60

    # In one batch with the store: the store ran, its answer waited for the batch's,
    # and the executor died before it went out. The new executor answers it when the
    # batch comes again (else this would be a ReplyTimeout for the store, after 60 s).
    stall(fleet, "cora", 3600.0)  # far past command_timeout (4 s)
    with pytest.raises(tr.RemoteError, match="past the worker's command_timeout of 4 s"):
        fleet.sync()

    assert torch.equal((kept * 2).get(), torch.tensor([10.0]))
    with pika.BlockingConnection(pika.URLParameters(daemons.url)) as connection:
        method, properties, body = connection.channel().basic_get("torchrelay.dead",
                                                                  auto_ack=True)
    assert method is not None, "the command was not dead-lettered"
    assert properties.type == "call"
    command, _ = decode_command("call", body)
    assert command.describe() == "call testing.stall"
    assert properties.headers["x-torchrelay-sender"] == "me"
    assert "past the worker's command_timeout" in properties.headers["x-torchrelay-reason"]
    kept.get()


def test_commands_that_ran_are_not_run_again_after_a_crash(contained: Any) -> None:
    _, fleet, cora = contained
    counter = torch.zeros(1).send(cora)
    for _ in range(40):
        counter += 1  # each acknowledged in a batch, a little later
    fleet.sync()
    os.kill(executor_of(cora), signal.SIGKILL)  # before the last acknowledgements went out

    assert counter.get().item() == 40  # redelivered ones were recognised and skipped


def test_sigterm_stops_a_daemon_whose_command_never_ends(contained: Any) -> None:
    daemons, fleet, _ = contained
    fleet.sync()  # serving
    stall(fleet, "cora", 3600.0)  # never ends, as far as the daemon can tell
    time.sleep(1.0)
    process = daemons.processes["cora"]

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=60) == 0  # stop_grace is 2 s: it did not wait for the end
    assert "still busy 2 s after the signal: killing it" in daemons.log_tail("cora")
    fleet.timeout = 1  # closing waits for the endless command's answer: not for long


def test_an_executor_dies_with_its_supervisor(contained: Any) -> None:
    # Left alone, it would go on running its command, holding the worker's queue, for
    # nobody: a daemon started again could not serve until it finished.
    daemons, fleet, cora = contained
    executor = executor_of(cora)
    stall(fleet, "cora", 3600.0)
    time.sleep(1.0)
    supervisor = daemons.processes["cora"]
    supervisor.kill()
    supervisor.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(executor):
        assert time.monotonic() < deadline, "the executor outlived its supervisor"
        time.sleep(0.1)
    fleet.timeout = 1
    daemons.processes.pop("cora")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_every_mirror_record_reads_back_as_it_was_written() -> None:
    """One codec for the executor that writes the mirror and both sides that read it."""
    parts = [
        *codec.storage_record(7, b"\x01\x02\x03"),
        codec.shared_record(8, 1 << 20),
        *codec.provenance_record(1, b"\x92\x90\x90"),
        *codec.tensor_record(42, 7, 1, dtype_code=3, offset=1, shape=(2, 1), stride=(1, 1),
                             requires_grad=True, has_graph=False),
        *codec.value_record(43, 1, b"frame"),
        codec.delete_record(42),
        *codec.parked_record(b"bob\0c.1", b"payload"),
        *codec.unparked_record(b"bob\0c.1"),
    ]
    records = list(codec.read_records(memoryview(b"".join(parts))))
    assert records[:3] == [
        codec.StorageRecord(7, 3, b"\x01\x02\x03", shared=False),
        codec.StorageRecord(8, 1 << 20, b"", shared=True),
        codec.ProvenanceRecord(1, b"\x92\x90\x90", b"".join(parts[3:5])),
    ]
    tensor = records[3]
    assert type(tensor) is codec.TensorRecord
    assert (tensor.object_id, tensor.key, tensor.provenance_id, tensor.dtype_code,
            tensor.offset, tensor.shape, tensor.stride, tensor.requires_grad,
            tensor.has_graph) == (42, 7, 1, 3, 1, (2, 1), (1, 1), True, False)
    assert tensor.record == b"".join(parts[5:7])
    assert records[4:] == [
        codec.ValueRecord(43, 1, b"frame", b"".join(parts[7:9])),
        codec.DeleteRecord(42),
        codec.ParkedRecord(b"bob\0c.1", b"payload"),
        codec.ParkedRecord(b"bob\0c.1", None),
    ]
    with pytest.raises(ValueError, match="unknown kind 99"):
        list(codec.read_records(memoryview(b"\x63")))
