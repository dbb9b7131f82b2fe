"""torchrelay's benchmark command: `python -m benchmarks` (see `benchmarks.cli`).

Every entry point of this package — the command itself and the child processes
it starts (`benchmarks.transfer_child`, `benchmarks.torch_rpc_child`,
`benchmarks.echo_server`) — imports this package first, so the filter below is in
place before any of them imports torch: torch warns on import when NumPy is
absent, and that warning would otherwise land in the middle of the table.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
