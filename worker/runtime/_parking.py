"""Recovery of the commands an executor's death interrupts while they wait.

A command waiting on another worker (a move for its destination's confirmation, a
call forwarded down a chain) is parked in the containment's mirror: what its
sender must be told, and what was made for it elsewhere. Should the executor die
before it is answered, the next one settles it — answers that it did not
complete and deletes what it made — rather than leave its caller waiting out the
whole timeout and its copy orphaned. Only supervised workers park (in process,
nothing outlives the worker to settle anything).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torchrelay.broker import Call, Command, Delete, OperationRefused, TorchRelayError, Transfer

from ._records import Containment, Job, ParkedCommand, Request, Task, made_by
from ._store import ObjectStore

__all__ = ["Parking"]

log = logging.getLogger("torchrelay.worker")


class Parking:
    """Parks and settles the waiting commands of worker `worker_id`."""

    def __init__(self, worker_id: str, containment: Containment, store: ObjectStore,
                 tell: Callable[[str, Command], None],
                 finish: Callable[[Job, object, Exception | None], None]) -> None:
        self.worker_id = worker_id
        self.containment = containment
        self.store = store
        self._tell = tell
        self._finish = finish

    def park(self, task: Task, request: Request) -> None:
        """Have what `task` answers and undoes outlive this executor while it waits on
        `request`."""
        job = task.job
        command, asked = job.command, request.command
        remote: list[int] = []
        local: list[int] = []
        restarted = f"worker {self.worker_id!r} restarted (its executor died)"
        if type(asked) is Delete:  # garbage down a chain, once the command itself ran
            message = (f"{restarted} after this command ran, while it deleted garbage on "
                       f"worker {request.worker_id!r}: what it made stands, its answer is lost")
        else:
            remote = made_by(asked)
            if remote and type(command) is Call and command.result_id is not None:
                local = [command.result_id]  # our pointer to that result
            message = (f"{restarted} while this command waited on worker "
                       f"{request.worker_id!r}: it did not complete")
            if type(command) is Transfer and remote:
                message += (f"; object {command.id} is still on worker {self.worker_id!r}, "
                            f"and any copy that reached {request.worker_id!r} is deleted")
        self.containment.parked(job.sender, job.correlation_id, ParkedCommand(
            job.sender, job.correlation_id, job.reply_to, job.name, message,
            request.worker_id, remote, local).encode())
        task.parked = True

    def unpark(self, task: Task) -> None:
        """`task` ended: nothing of it is left to settle."""
        if task.parked:
            self.containment.unparked(task.job.sender, task.job.correlation_id)
            # Now, with what it changed: were the executor to die before the next
            # commit, the next one would undo a command that completed.
            self.containment.commit()
            task.parked = False

    def settle(self, payloads: list[bytes]) -> None:
        """Answer and undo the commands a dead executor left waiting; each is forgotten
        once settled (until then the supervisor's copy keeps it)."""
        for payload in payloads:
            parked = ParkedCommand.decode(payload)
            log.warning("%s %s from %s: %s", parked.name, parked.correlation_id,
                        parked.sender, parked.message)
            try:
                for object_id in parked.local:
                    self.store.discard(object_id)
                if parked.remote:
                    self._tell(parked.location, Delete(parked.remote))
                self._finish(Job(parked.name, None, parked.sender, parked.reply_to,
                                 parked.correlation_id), None, OperationRefused(parked.message))
            except TorchRelayError as e:  # the broker is away: its caller times out
                log.warning("could not answer %s %s: %s", parked.name, parked.correlation_id, e)
            self.containment.unparked(parked.sender, parked.correlation_id)
            self.containment.commit()
