"""When to save by time: a fixed interval, or the Young–Daly interval from measured costs.

Young and Daly's first-order optimum for the time between checkpoints is
``sqrt(2 * C * MTBF)``, where ``C`` is what one save costs the training loop
and ``MTBF`` the mean time between failures. Saving more often wastes time on
saves; saving less often loses more work at each failure.

- ``C`` is measured: the time the training loop was blocked by the last save.
  That is the whole save when synchronous, and the copy to host memory plus
  any wait for the previous save when asynchronous.
- ``MTBF`` is configured, or observed from the run's journal: the time the run
  has been training, over its attempts, divided by the number of interruptions
  plus one. Until an interruption has been seen it is at least an hour, so the
  first minutes of a fresh run do not make it save every few seconds.

A background save cannot start before the previous one is written, so the
adaptive interval is never shorter than the last background write.

This object is local to a rank. Each rank reports whether it requests a save, and
the stop agreement (:mod:`resilient.agreement`) turns that into one decision
that every rank takes at the same step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from resilient._logging import get_logger
from resilient.journal import read_journal

log = get_logger(__name__)

AUTO = "auto"

#: Seconds before the first adaptive save when no save cost is known yet (a
#: fresh run), or half the MTBF when that is shorter. That save measures the cost.
FIRST_SAVE_SECONDS = 60.0


#: Lower bound of an observed MTBF while no interruption has been seen, because
#: ten minutes of training without a failure tell little about the MTBF.
MIN_UNFAILED_MTBF_SECONDS = 3600.0

#: Events written by the training processes while they train (not by resilient run between attempts).
_TRAINING_EVENTS = ("signal", "stop", "checkpoint")


def observed_history(root: Path) -> tuple[float, int]:
    """Return (seconds trained in earlier attempts, number of earlier attempts) from the journal.

    Each ``resume`` event starts an attempt; an attempt lasts until the last
    event before the next ``resume``. Every earlier attempt of a run that is
    still training ended in an interruption.
    """
    uptime = 0.0
    attempts = 0
    start: float | None = None
    last: float | None = None
    for event in read_journal(root).events:
        when = event.get("time")
        if not isinstance(when, (int, float)):
            continue
        if event.get("event") == "resume":
            if start is not None and last is not None:
                uptime += max(last - start, 0.0)
                attempts += 1
            start = last = float(when)
        elif start is not None and event.get("event") in _TRAINING_EVENTS:
            last = float(when)
    if start is not None and last is not None:
        uptime += max(last - start, 0.0)
        attempts += 1
    return uptime, attempts


class SaveSchedule:
    """Decides on one rank whether a time-based save is due."""

    def __init__(self, interval: float | str | None, mtbf: float | None, root: Path,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.setting = interval
        self.mtbf_setting = mtbf
        self._root = root
        self._clock = clock
        self._last_save = clock()
        self._started = clock()
        self._earlier_uptime = 0.0
        self._earlier_attempts = 0
        self.cost: float | None = None
        self.write_seconds: float | None = None
        self._logged_interval: float | None = None

    @property
    def enabled(self) -> bool:
        return self.setting is not None

    @property
    def adaptive(self) -> bool:
        return self.setting == AUTO

    def start(self, resumed_save_seconds: float | None) -> None:
        """Read the run's history; call once when training starts, before this attempt is journaled."""
        now = self._clock()
        self._started = self._last_save = now
        if self.adaptive and self.mtbf_setting is None:
            self._earlier_uptime, self._earlier_attempts = observed_history(self._root)
        if self.cost is None and resumed_save_seconds is not None:
            # The resumed checkpoint's save time, until this attempt measures its own.
            self.cost = resumed_save_seconds

    def mtbf(self) -> tuple[float, str]:
        """Return the mean time between failures in seconds, and where it comes from."""
        if self.mtbf_setting is not None:
            return float(self.mtbf_setting), "configured"
        uptime = self._earlier_uptime + (self._clock() - self._started)
        failures = self._earlier_attempts
        if failures == 0:
            return max(uptime, MIN_UNFAILED_MTBF_SECONDS), (
                f"observed: no interruption in {uptime:.0f} s of training, so at least "
                f"{MIN_UNFAILED_MTBF_SECONDS:.0f} s")
        return uptime / (failures + 1), f"observed: {uptime:.0f} s of training over {failures} interruptions, plus one"

    def interval(self) -> float | None:
        """Seconds between time-based saves now; None when disabled."""
        if self.setting is None:
            return None
        if not self.adaptive:
            return float(self.setting)
        mtbf, _source = self.mtbf()
        if self.cost is None:
            # The first save measures the cost; it must not wait longer than failures are apart.
            return min(FIRST_SAVE_SECONDS, mtbf / 2)
        optimum = math.sqrt(2.0 * max(self.cost, 1e-6) * mtbf)
        return max(optimum, self.write_seconds or 0.0)

    def wanted(self) -> bool:
        interval = self.interval()
        if interval is None:
            return False
        return self._clock() - self._last_save >= interval

    def saved(self, blocking_seconds: float) -> None:
        """Record a save that blocked the training loop for ``blocking_seconds``; restarts the interval."""
        self._last_save = self._clock()
        self.cost = blocking_seconds
        self._log_interval()

    def written(self, write_seconds: float) -> None:
        """Record how long the last background save took to commit."""
        self.write_seconds = write_seconds

    def _log_interval(self) -> None:
        if not self.adaptive:
            return
        interval = self.interval()
        if interval is None or (self._logged_interval and abs(interval / self._logged_interval - 1) < 0.2):
            return
        self._logged_interval = interval
        mtbf, source = self.mtbf()
        log.info("Adaptive save interval is now %.0f s (Young-Daly: save cost %.3f s, MTBF %.0f s, %s).",
                 interval, self.cost or 0.0, mtbf, source)
