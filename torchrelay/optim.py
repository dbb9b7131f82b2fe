"""`tr.optim.SGD`, `tr.optim.Adam`: optimizers built where the parameters are.

    bobs_opt = tr.optim.SGD(params=bobs_model.parameters(), lr=0.1)
    bobs_opt.zero_grad(); ...; bobs_opt.step()     # both run on bob

After `tr.hook(torch)`, `torch.optim.SGD(params=bobs_model.parameters(), lr=0.1)`
does the same.
"""

from __future__ import annotations

from torchrelay.client._optim import SGD, Adam, RemoteOptimizer

__all__ = ["SGD", "Adam", "RemoteOptimizer"]
