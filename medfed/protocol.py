"""What sites and coordinator agree on beyond Flower's own message types.

Error codes a site uses when it does not send an update (Flower's own codes are
below 100, ours start at 4000 so the coordinator's report can tell them apart),
and the config keys both ends of secure aggregation read. Neither end imports
the other, so these live here.
"""

from __future__ import annotations

#: The site declined the round because it would cross its privacy cap.
SITE_DECLINED = 4001
#: The site refused the run's settings (e.g. δ not below 1/n, no DP); message says which.
SITE_REFUSED = 4002
#: The reply was stopped by the site's egress allow-list.
EGRESS_BLOCKED = 4003
#: The site failed; details stay in the site's own log (they may name local files).
SITE_FAILED = 4004

#: Not a site's code: the coordinator refused the site's reply (coordinator.screening says why).
COORDINATOR_REJECTED = 4005

#: Train-config key telling a site's SecAgg+ adapter the model's array names (legacy Parameters carry none).
ARRAY_NAMES_KEY = "array-names"
#: Train-config key asking the sites to weight their masked update uniformly (site-level DP, uniform weights).
UNIFORM_WEIGHT_KEY = "uniform-weight"

#: The record of a run's last message that carries the signed release (file name -> bytes), and the one
#: metric a site answers it with: 1, it verified the release and kept it.
RELEASE_RECORD = "release"
RELEASE_KEPT = "release-kept"

ERROR_NAMES = {
    SITE_DECLINED: "declined",
    SITE_REFUSED: "refused",
    EGRESS_BLOCKED: "egress-blocked",
    SITE_FAILED: "failed",
    COORDINATOR_REJECTED: "rejected",
}
