"""Fashion-MNIST: find or download the four IDX gz files, verify, decode once,
split, and keep each split as one tensor on the training device."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# SHA-256 of the *decompressed* IDX files. The gz bytes differ between the
# official mirror and re-packaged copies (Debian's dataset-fashion-mnist
# re-compresses them), while the IDX payload is the same everywhere.
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
OFFICIAL_SHA256 = {name: sha for name, sha in FILES.values()}
FIX = ("Fix: delete it and run again to re-download, or install the Debian package "
       "dataset-fashion-mnist, or point data.root / $FMNIST_DATA_DIR at good copies.")


class DataError(UserError):
    pass


def read_idx(path: Path, sha256: str | None = None, fix: str = FIX) -> np.ndarray:
    """Decode one IDX file of unsigned bytes, gzipped or not, checking magic, shape and checksum;
    ``fix`` ends every error's line."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a complete gzip file ({e}). {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex() or 'missing'}, "
                        f"expected 00000801 or 00000803). {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated. {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says shape {dims} ({int(np.prod(dims))} bytes) "
                        f"but the file holds {len(raw) - header} bytes. {fix}")
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{path}: checksum mismatch (the contents are not the official "
                        f"Fashion-MNIST file). {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _copy_with_progress(src, dst, total: int, name: str, show: bool) -> None:
    """Copy ``response`` into ``out`` with a progress bar on a terminal."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(*Progress.get_default_columns()[:3], DownloadColumn(), TransferSpeedColumn(),
                  disable=not show) as bar:
        task = bar.add_task(f"downloading {name}", total=total or None)
        while chunk := src.read(1 << 16):
            dst.write(chunk)
            bar.update(task, advance=len(chunk))


def download(mirror: str, dest: Path, checksums: dict[str, str] | None = None, progress: bool = True) -> None:
    """Fetch the four files from ``mirror`` into ``dest``, verifying each before it is kept."""
    checksums = OFFICIAL_SHA256 if checksums is None else checksums
    dest.mkdir(parents=True, exist_ok=True)
    for name, _ in FILES.values():
        url = mirror.rstrip("/") + "/" + name
        tmp = dest / (name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                _copy_with_progress(r, f, int(r.headers.get("Content-Length") or 0), name, progress)
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            reason = getattr(e, "reason", e)
            raise DataError(f"could not download {url} ({reason}). Fix: check the network, or install "
                            "the Debian package dataset-fashion-mnist, or copy the four files into "
                            "data.root / $FMNIST_DATA_DIR.") from None
        try:
            read_idx(tmp, checksums.get(name))
        except DataError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"downloaded {url} is bad: {e}") from None
        tmp.replace(dest / name)


def _has_all(d: Path) -> bool:
    return all((d / name).is_file() for name, _ in FILES.values())


def locate(root: str | None, cache_dir: str, download_ok: bool, mirror: str,
           checksums: dict[str, str] | None = None) -> Path:
    """The first folder holding all four files: root, cache_dir, the Debian package's
    folder; else download into root (or cache_dir)."""
    cache = Path(cache_dir).expanduser()
    candidates = ([Path(root).expanduser()] if root else []) + [cache, SYSTEM_DIR]
    for d in candidates:
        if _has_all(d):
            return d
    target = Path(root).expanduser() if root else cache
    if not download_ok:
        raise DataError("Fashion-MNIST not found in " + ", ".join(map(str, candidates)) +
                        ". Fix: install the Debian package dataset-fashion-mnist, or set "
                        "$FMNIST_DATA_DIR to a folder with the four IDX gz files, or allow data.download=true.")
    download(mirror, target, checksums)
    return target


def decode(folder: Path, cache_dir: str, checksums: dict[str, str] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The four arrays and one checksum naming the data, decoded once and cached.

    The cache (an uncompressed .npz) is keyed by the source files' paths, sizes
    and mtimes, so a second run skips gzip and hashing entirely."""
    checksums = OFFICIAL_SHA256 if checksums is None else checksums
    stamp = {name: [str((folder / name).resolve()), (folder / name).stat().st_size,
                    (folder / name).stat().st_mtime_ns] for name, _ in FILES.values()}
    stamp["checksums"] = [checksums.get(name) for name, _ in FILES.values()]
    cache = Path(cache_dir).expanduser()
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    npz, meta = cache / f"decoded-{key}.npz", cache / f"decoded-{key}.json"
    if npz.is_file() and meta.is_file():
        try:
            with np.load(npz) as z:
                arrays = {k: z[k] for k in FILES}
            return arrays, json.loads(meta.read_text())["checksum"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    arrays, digest = {}, hashlib.sha256()
    for key_name, (name, _) in FILES.items():
        arrays[key_name] = read_idx(folder / name, checksums.get(name))
        digest.update(arrays[key_name].tobytes())
    checksum = digest.hexdigest()
    n_img, n_lab = len(arrays["train_images"]), len(arrays["train_labels"])
    if n_img != n_lab or len(arrays["test_images"]) != len(arrays["test_labels"]):
        raise DataError(f"{folder}: image and label counts differ ({n_img} vs {n_lab}). {FIX}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{npz.name}.{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        tmp.replace(npz)
        meta.write_text(json.dumps({"checksum": checksum, "source": stamp}))
    except OSError:
        pass  # a read-only cache only costs the next run a re-decode
    return arrays, checksum


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (taken, rest): ``fraction`` of every class, seeded; both sorted."""
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        taken.append(idx[: int(round(fraction * len(idx)))])
    taken = np.sort(np.concatenate(taken)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), taken)
    return taken, rest


@dataclass
class Split:
    """One split on the device: images (N, 1, 28, 28) float32 in [0, 1], labels int64, and
    a digest naming its contents (the data's checksum, the split's name and its indices)."""

    x: torch.Tensor
    y: torch.Tensor
    digest: str = ""

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """(x, y) batches by index slicing; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator).to(self.x.device) if generator is not None else None
        for i in range(0, n, batch_size):
            if order is None:
                yield self.x[i:i + batch_size], self.y[i:i + batch_size]
            else:
                idx = order[i:i + batch_size]
                yield self.x[idx], self.y[idx]


def augment(x: torch.Tensor, shift: int = 0, flip: bool = False, erase: float = 0.0) -> torch.Tensor:
    """A batch of (N, 1, H, W) images, each randomly flipped left-right (if ``flip``),
    shifted by up to ``shift`` pixels each way with zero fill, and with probability
    ``erase`` given a random rectangle of noise (random erasing: 2-40% of the image,
    aspect 0.3-3.3), all on x's device in a few batched operations."""
    n, c, h, w = x.shape
    if flip:
        x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    if shift:
        padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * shift + 1, (n, 1, 1), device=x.device)
        rows = dy + torch.arange(h, device=x.device).view(1, h, 1)
        cols = dx + torch.arange(w, device=x.device).view(1, 1, w)
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1), 0, rows, cols].unsqueeze(1)
    if erase:
        dev = x.device
        area = torch.empty(n, device=dev).uniform_(0.02, 0.4) * h * w
        ratio = torch.empty(n, device=dev).uniform_(math.log(0.3), -math.log(0.3)).exp()
        eh = (area * ratio).sqrt().clamp(1, h).floor()
        ew = (area / ratio).sqrt().clamp(1, w).floor()
        top = (torch.rand(n, device=dev) * (h - eh + 1)).floor()
        left = (torch.rand(n, device=dev) * (w - ew + 1)).floor()
        ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
        box = ((ys >= top.view(n, 1, 1)) & (ys < (top + eh).view(n, 1, 1))
               & (xs >= left.view(n, 1, 1)) & (xs < (left + ew).view(n, 1, 1)))
        box &= torch.rand(n, 1, 1, device=dev) < erase
        x = torch.where(box.unsqueeze(1), torch.rand_like(x), x)
    return x


@dataclass
class FashionMNIST:
    train: Split
    val: Split
    test: Split
    checksum: str  # SHA-256 over the four decoded arrays
    source: str = ""  # the folder the files were read from


def _split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, device, checksum: str, name: str) -> Split:
    x = torch.from_numpy(images[idx]).to(device).unsqueeze(1).float().div_(255)
    digest = hashlib.sha256(f"{checksum}:{name}:".encode() + idx.astype("<i8").tobytes()).hexdigest()[:16]
    return Split(x, torch.from_numpy(labels[idx].astype(np.int64)).to(device), digest)


def load(cfg, device="cpu", checksums: dict[str, str] | None = None) -> FashionMNIST:
    """Train/val/test splits as configured by the ``data`` config group."""
    if not cfg.verify:
        checksums = {}
    folder = locate(cfg.root, cfg.cache_dir, cfg.download, cfg.mirror, checksums)
    arrays, checksum = decode(folder, cfg.cache_dir, checksums)
    images, labels = arrays["train_images"], arrays["train_labels"]
    val_idx, train_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
    if cfg.train_fraction < 1:
        keep, _ = stratified_split(labels[train_idx], cfg.train_fraction, cfg.split_seed + 1)
        train_idx = train_idx[keep]
    test_idx = np.arange(len(arrays["test_labels"]))
    if cfg.test_fraction < 1:
        test_idx, _ = stratified_split(arrays["test_labels"], cfg.test_fraction, cfg.split_seed + 2)
    return FashionMNIST(
        train=_split(images, labels, train_idx, device, checksum, "train"),
        val=_split(images, labels, val_idx, device, checksum, "val"),
        test=_split(arrays["test_images"], arrays["test_labels"], test_idx, device, checksum, "test"),
        checksum=checksum, source=str(folder.resolve()))
