"""What bench/gpu_check.sh carries to a GPU machine without a package index.

    python bench/gpu_carry.py requirements     the dependencies to install there (torch excepted)
    python bench/gpu_carry.py prune DIR        delete from DIR the wheels of packages the GPU
                                               machine's image already has (it keeps its own)
    python bench/gpu_carry.py data DIR         a slice of the real Fashion-MNIST as IDX files in DIR:
                                               the first 12,000 training and 2,000 test images
"""

from __future__ import annotations

import gzip
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLICE = {"train": 12000, "t10k": 2000}
# Python packages the lent H200 machine's image holds (the device tool's KINDS.md, read
# 2026-11-30), among those our dependencies pull: carried, they would only add megabytes.
PRESENT = """aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle contourpy cycler execnet filelock fonttools frozenlist fsspec grpcio h11 httpcore httpx idna
iniconfig jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl msgpack multidict
narwhals numpy packaging pandas pillow pip pluggy propcache protobuf psutil pyarrow pygments pyparsing
pytest pytest-xdist python-dateutil pyyaml requests rich scikit-learn scipy setuptools six threadpoolctl
typing-extensions urllib3 werkzeug wheel wrapt yarl zipp""".split()


def requirements() -> list[str]:
    """pyproject's dependencies without torch (the machine's own CUDA build stays), and the tests' runner."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not d.startswith("torch")]
    return deps + ["pytest>=8", "pytest-xdist>=3.5"]


def _project(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", wheel.split("-")[0]).lower()


def prune(folder: Path) -> None:
    """Delete the wheels of PRESENT packages: there, pip installs the rest beside them."""
    present = set(PRESENT)
    for wheel in folder.glob("*.whl"):
        if _project(wheel.name) in present:
            wheel.unlink()


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
    elif sys.argv[1:2] == ["prune"] and len(sys.argv) == 3:
        prune(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
