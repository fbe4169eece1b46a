"""The coordinator's side: Flower ServerApp, strategies, checkpoints, run reports.

Has no business with DICOM or the site: never imports ``site_client``, and of ``anonymization``
only the audit-anchor format both ends parse (docs/design.md, Parts; tests/medfed/test_design.py).
"""

import medfed.hardening as _hardening

_hardening.apply()
