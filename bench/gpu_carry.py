"""What bench/gpu_check.sh carries to a GPU machine without a package index.

    python bench/gpu_carry.py requirements     the dependencies to install there (torch excepted)
    python bench/gpu_carry.py data DIR         a slice of the real Fashion-MNIST as IDX files in DIR:
                                               the first 12,000 training and 2,000 test images
"""

from __future__ import annotations

import gzip
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLICE = {"train": 12000, "t10k": 2000}


def requirements() -> list[str]:
    """pyproject's dependencies without torch (the machine's own CUDA build stays), and the tests' runner."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not d.startswith("torch")]
    return deps + ["pytest>=8", "pytest-xdist>=3.5", "hatchling>=1.24", "editables"]


def data(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from fmnist_sweep.data import FILES, SYSTEM_DIR, read_idx

    folder.mkdir(parents=True, exist_ok=True)
    for name, _ in FILES.values():
        array = read_idx(SYSTEM_DIR / name)[:SLICE[name.split("-")[0]]]
        header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["requirements"]:
        print(" ".join(f"'{r}'" if " " in r else r for r in requirements()))
    elif sys.argv[1:2] == ["data"] and len(sys.argv) == 3:
        data(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
