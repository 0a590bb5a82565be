"""Peak resident memory of this process image (since its exec), in MiB, for per-process measurements.

getrusage(RUSAGE_SELF).ru_maxrss carries the parent's resident size over fork + exec on Linux: a child
of a 1 GiB parent reports at least 1 GiB. /proc/self/status VmHWM is this image's own high-water mark;
ru_maxrss is the fallback where there is no /proc.
"""

from __future__ import annotations

import resource
from pathlib import Path

STATUS = Path("/proc/self/status")
HIGH_WATER_FIELD = "VmHWM:"
KIB = 1024


def peak_rss_mib() -> float:
    if STATUS.exists():
        for line in STATUS.read_text().splitlines():
            if line.startswith(HIGH_WATER_FIELD):
                return int(line.split()[1]) / KIB  # the kernel reports kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB  # Linux units: KiB
