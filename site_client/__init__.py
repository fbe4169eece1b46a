"""The site's side: Flower ClientApp, privacy budget ledger, egress allow-list."""

import medfed.hardening as _hardening

_hardening.apply()
