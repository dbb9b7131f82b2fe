"""The worker's commands, one module per family, each handler registered next to
its command's name (`@handles(Fetch)`, `_registry.py`):

- `tensors`: store, fetch, delete, call (run here, or forwarded down a chain), meta;
- `transfers`: transfer (a move) and pull (a pointer's target brought here);
- `plans`: define and run a recorded plan;
- `datasets`: search this worker's datasets, and load them;
- `privacy`: the guard every way out passes (what may be fetched, moved,
  released) and aggregation, with its privacy accounting;
- `training`: `dp_train`, DP-SGD run by the data owner's worker itself;
- `secure`: secure aggregation, an owner's steps and the aggregator's;
- `fleet`: describe, grant, status.

Adding a command: declare it in `broker/_protocol.py`, write its handler in the
family it belongs to under `@handles(TheCommand)`, and the client method that
sends it. Nothing else lists commands.
"""

from . import datasets, fleet, plans, privacy, secure, tensors, training, transfers
from ._registry import HANDLERS, Encoded, Handler, handles

__all__ = ["HANDLERS", "Encoded", "Handler", "datasets", "fleet", "handles", "plans",
           "privacy", "secure", "tensors", "training", "transfers"]
