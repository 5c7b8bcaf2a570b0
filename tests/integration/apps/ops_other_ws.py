"""An app named like ops_dash's, run in another workspace (tests/integration/test_metrics.py:
two workspaces' apps of one name keep apart series)."""

from __future__ import annotations

import strato

app = strato.App("strato-test-ops")


@app.function()
def triple(x: int) -> int:
    return 3 * x
