"""medfed: federated learning for a consortium of hospitals.

Importing any medfed package applies the process hardening of
:mod:`medfed.hardening` first (invariant 6: no traffic but to the coordinator).
"""

from medfed import hardening as _hardening

_hardening.apply()

__version__ = "0.1.0"
