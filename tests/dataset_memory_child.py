"""Peak memory of `CustomImageDataset` reads: `python dataset_memory_child.py CASES.json`.

CASES.json is a list of `{"name", "csv", "img_dir", "max_pixels" (optional)}`. For each case
in turn, the child builds the dataset, resets the peak of its resident memory (Linux:
`/proc/self/clear_refs`), loads image 0, and records what happened (the image's shape and
sum, or the error) and how far the peak rose above the resident memory before the load. It
prints one JSON object, case name -> result.

Its address space is capped 1 GiB above where it stands after the imports (RLIMIT_AS): a read
that would take gigabytes fails here, instead of taking the memory of the machine running the
tests.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from trainkit.datasets import CustomImageDataset, DatasetError

HEADROOM = 2**30


def status(key: str) -> int:
    """A `/proc/self/status` figure (`VmRSS`, `VmHWM`, `VmSize`), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(case: dict[str, Any]) -> dict[str, Any]:
    limit = {"max_pixels": case["max_pixels"]} if "max_pixels" in case else {}
    ds = CustomImageDataset(case["csv"], case["img_dir"], **limit)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    result: dict[str, Any]
    try:
        image, _ = ds[0]
        result = {"shape": list(image.shape), "sum": int(image.sum())}
    except DatasetError as err:
        result = {"error": str(err)}
    except (MemoryError, RuntimeError) as err:  # what a capped allocation raises
        result = {"crash": f"{type(err).__name__}: {err}"}
    result["peak"] = status("VmHWM") - before
    return result


def main(cases_file: Path) -> None:
    room = status("VmSize") + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (room, room))
    cases = json.loads(cases_file.read_text())
    print(json.dumps({case["name"]: measure(case) for case in cases}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
