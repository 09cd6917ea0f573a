"""Device resolution: one ``device`` argument everywhere, never a ``cuda=True`` flag."""

from __future__ import annotations

from hcdiag.errors import InputError, flag


def resolve_device(device="auto"):
    """Return a ``torch.device`` for ``'auto' | 'cpu' | 'cuda' | 'cuda:N'`` or a torch.device.

    ``auto`` picks CUDA when available, else CPU. Asking for CUDA without one is an input error.
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device or "auto").lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise InputError(f"The 'device' parameter must be auto, cpu or cuda. Got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("The 'device' parameter asks for cuda but no CUDA device is available; use "
                         + flag("--device cpu or auto", "device='cpu' or 'auto'") + ".")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"The 'device' parameter must be auto, cpu or cuda. Got {device!r}.")
    return dev
