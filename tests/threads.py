"""Torch on one thread, as the daemons run (`--torch-threads 1`): a reference computed
in the test's process then sums in the daemons' order (on some CPUs a kernel sums in
another order on two threads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_torch_thread"]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
