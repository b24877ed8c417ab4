"""How long the tests wait for something to become ready, scaled to the machine that runs them.

Every limit in the tests is what a quiet 4-core machine needs, with room to spare. ``patience(seconds)`` stretches
it on a smaller or busier machine: by 4 / CPUs below 4 usable CPUs (a cgroup's CPU quota counts), and by the load
average per CPU when the session starts, above 1; never shorter, at most 8 times. ``DOLAB_TEST_PATIENCE=<factor>``
sets the factor outright (``DOLAB_TEST_PATIENCE=3`` on a slow CI runner). A generous limit costs time only when
something is really broken: a wait ends as soon as what it waits for is there.

Waits poll (a hub's API, a log, a page); none is a fixed sleep. The factor is computed once, when pytest imports this
module: the tests' own hubs and servers must not make it grow while the suite runs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: The machine the limits in the tests are written for.
REFERENCE_CPUS = 4
#: The longest stretch: beyond it a wait hides a hang rather than a slow machine.
MAX_FACTOR = 8.0
ENV = "DOLAB_TEST_PATIENCE"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus() -> float:
    """The CPUs this process may run on, capped by a cgroup v2 CPU quota (containers, CI runners)."""
    cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(int(quota) / int(period), 0.5))
    except (OSError, ValueError):
        pass
    return cpus


def machine_factor(cpus: float, load: float) -> float:
    """The stretch for ``cpus`` usable CPUs with ``load`` (the 1-minute load average): at least 1, at most 8."""
    factor = max(1.0, REFERENCE_CPUS / cpus) * max(1.0, load / cpus)
    return min(MAX_FACTOR, factor)


def session_factor() -> tuple[float, str]:
    """The factor for this session, and a line saying where it comes from (for pytest's header)."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            factor = float(raw)
        except ValueError:
            factor = math.nan
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"{ENV} must be a positive number (a factor such as 2 or 3.5), not {raw!r}")
        return factor, f"patience: {factor:g}x ({ENV})"
    cpus, load = usable_cpus(), os.getloadavg()[0]
    factor = machine_factor(cpus, load)
    return factor, f"patience: {factor:.2g}x ({cpus:g} usable CPUs, load {load:.2f}; {ENV}=<factor> overrides)"


FACTOR, DESCRIPTION = session_factor()


def patience(seconds: float) -> float:
    """``seconds`` (a limit for a quiet 4-core machine) stretched to this machine: see the module's docstring."""
    return seconds * FACTOR


def patience_ms(seconds: float) -> float:
    """:func:`patience` in milliseconds, as Playwright takes its timeouts."""
    return patience(seconds) * 1000
