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


def _routing_forward(forward) -> bool:
    """Whether a class's forward is kernels' routing wrapper (``functools.wraps`` copies the name
    and module of the forward it wraps; its globals stay kernels')."""
    module = getattr(forward, "__globals__", {}).get("__name__", "")
    return hasattr(forward, "__wrapped__") and module.split(".")[0] == "kernels"


def bypass_kernel_routing(model: nn.Module) -> int:
    """Give every module whose class forward routes hub kernels its undecorated forward (an
    instance attribute: the class and other models are untouched). Returns how many."""
    count = 0
    for module in model.modules():
        forward = type(module).forward
        if _routing_forward(forward):
            module.forward = types.MethodType(forward.__wrapped__, module)
            count += 1
    return count
