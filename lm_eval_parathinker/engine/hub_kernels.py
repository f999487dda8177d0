"""Keep transformers' hub-kernel routing out of the compiled decode step.

Where the ``kernels`` package is installed (transformers 5.25 requires it), attention classes
decorated with ``use_kernelized_func`` wrap their forward in kernels' ``new_forward``, which routes
a function (RoPE) to a per-model wrapper through a module-level context variable set on every call.
Under ``torch.compile`` that variable becomes a plain global which the compiled step leaves set
(kernels 0.19.1): Dynamo guards on it and the next call recompiles the whole step. The routing only
matters for a model kernelized with hub kernels, which the engine never does, so its compiled step
calls the undecorated forward.
"""

from __future__ import annotations

import types

from torch import nn

from ..upstream import kernels as upstream_kernels


def bypass_kernel_routing(model: nn.Module) -> int:
    """Give every module whose class forward routes hub kernels its undecorated forward (an
    instance attribute: the class and other models are untouched). Returns how many."""
    count = 0
    for module in model.modules():
        forward = upstream_kernels.undecorated_forward(type(module).forward)
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            count += 1
    return count
