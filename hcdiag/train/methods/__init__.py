"""The methods of the system under test, by name: Historical Consensus, its baselines, and the companion
notes' teacher-guided VAE.

>>> list(METHODS)
['hct', 'vanilla', 'beta', 'anneal', 'freebits', 'aggressive', 'em-type', 'teacher']
"""

from __future__ import annotations

from hcdiag.train.methods.aggressive import Aggressive
from hcdiag.train.methods.base import Method
from hcdiag.train.methods.em_type import EMType
from hcdiag.train.methods.hct import HCT
from hcdiag.train.methods.teacher import Teacher
from hcdiag.train.methods.vae import Anneal, Beta, FreeBits, Vanilla

METHODS: dict[str, Method] = {m.name: m for m in (HCT(), Vanilla(), Beta(), Anneal(), FreeBits(), Aggressive(),
                                                   EMType(), Teacher())}


def get_method(name: str) -> Method:
    """The registered method ``name`` (the config validated it)."""
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
