"""hcdiag: executable, falsifiable checks of Historical Consensus Training.

The package is laid out in the direction data flows:
``data`` -> ``spectrum`` / ``theory`` -> ``clusterings`` -> ``train`` (the system under
test) -> ``runfile`` (the contract) -> ``checks`` -> ``report`` -> ``verify``.
``cli`` and ``testing`` are thin doors onto these. Importing ``hcdiag`` does not import torch.
"""

__version__ = "0.1.0"

from hcdiag.errors import HcdiagError, InputError  # noqa: F401


def __getattr__(name: str):
    # hcdiag.Recorder without importing torch on `import hcdiag` (the recorder needs it; the CLI's start does not)
    if name == "Recorder":
        from hcdiag.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'hcdiag' has no attribute {name!r}")
