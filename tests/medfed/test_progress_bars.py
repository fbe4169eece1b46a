"""Every progress bar medfed shows fits an 80-column terminal: nothing squeezed, wrapped or cut.

A bar is rendered at its largest (six-digit counts, every field filled) once at width 80 and once on a
wide console; the two must be the same text, every line within 80 characters.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import pytest
from rich.console import Console
from rich.progress import Progress

#: Large enough that every count takes its widest form.
TOTAL = 123_456
DONE = 98_765


def _rendered(progress: Progress, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(progress.get_renderable())
    return [line.rstrip() for line in console.export_text().splitlines()]


def _scoring() -> Progress:
    from site_client.inference import scoring_progress

    bar = scoring_progress(True)
    task = bar.add_task("scoring", total=TOTAL)
    bar.advance(task, DONE)
    return bar


def _deid() -> Progress:
    from anonymization.batch import progress_bar

    bar = progress_bar(True)
    task = bar.add_task("deid", total=TOTAL, ok=0, quarantined=0, skipped=0, resumed=0)
    bar.update(task, advance=DONE, ok=DONE - 4_321, quarantined=4_321, skipped=12_345, resumed=10_000)
    for t in bar.tasks:  # a minute into the run: a site's real rate (~1,600 files/s), not one instant's
        t.start_time = (t.start_time or 0.0) - 60.0
    return bar


@pytest.mark.parametrize("make", [
    pytest.param(_scoring, id="predict-scoring"),
    pytest.param(_deid, id="deid-run"),
])
def test_the_bar_fits_80_columns(make: Callable[[], Progress]) -> None:
    bar = make()
    narrow, wide = _rendered(bar, 80), _rendered(bar, 200)
    rate = re.compile(r"[\d,.]+/s")  # a throughput moves between the two renders; its width is what counts
    assert [rate.sub("R/s", ln) for ln in narrow] == [rate.sub("R/s", ln) for ln in wide], \
        f"squeezed at 80 columns:\n{wide}"
    assert wide and all(len(line) <= 80 for line in wide), wide
    assert f"{DONE}/{TOTAL}" in " ".join(wide)
