"""The coordinator's side: Flower ServerApp, strategies, checkpoints, run reports.

Has no business with DICOM: never imports ``anonymization`` or ``site_client``.
"""

import medfed.hardening as _hardening

_hardening.apply()
