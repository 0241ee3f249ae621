"""A client script that reports whether PyTorch asked for huge pages under a 4 MiB tensor it
allocates (the ``hg`` flag of the tensor's mapping in /proc/self/smaps), one line per round."""

from pathlib import Path

import pytest

#: a kernel built without transparent huge pages refuses the advice: nothing to check there
needs_thp = pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
    reason="this kernel has no transparent huge pages",
)

CLIENT = """\
import torch

import fedctl.client as flare


def huge_pages_advised(t):
    addr, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for row in f:
            head = row.split(maxsplit=1)[0]
            if not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return "hg" in row.split()
    raise SystemExit("no mapping holds the tensor")


flare.init()
while flare.is_running():
    received = flare.receive()
    big = torch.ones(1 << 20)
    print("HUGE_PAGES", huge_pages_advised(big), flush=True)
    flare.send(flare.FLModel(params=received.params, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def reported(logs: list[str]) -> list[str]:
    """The HUGE_PAGES lines of the client logs given."""
    return [line for text in logs for line in text.splitlines() if line.startswith("HUGE_PAGES")]
