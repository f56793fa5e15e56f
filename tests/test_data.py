import gzip
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fmnist_sweep import data
from fmnist_sweep.data import FILES, DataError, read_idx
from tests.helpers import idx_bytes, write_idx


def data_cfg(**kw):
    base = OmegaConf.load(data.Path(__file__).parents[1] / "conf" / "data" / "fashion_mnist.yaml")
    base.root = None
    base.update(kw)
    return base


def test_reads_good_idx(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(p), arr)


def test_truncated_file_names_file_and_fix(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28))))[:-30])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a complete gzip file.*Fix:"):
        read_idx(p)


def test_header_shape_larger_than_payload(tmp_path):
    p = tmp_path / "labels.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(10))[:-3]))
    with pytest.raises(DataError, match=r"labels.gz: IDX header says shape \(10,\).*holds 7 bytes"):
        read_idx(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "labels.gz"
    p.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc"))
    with pytest.raises(DataError, match="labels.gz: not an IDX file of unsigned bytes .magic 00000d01"):
        read_idx(p)


def test_wrong_checksum(tmp_path):
    p = tmp_path / "labels.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(10))))
    with pytest.raises(DataError, match="labels.gz: checksum mismatch.*Fix: delete it"):
        read_idx(p, sha256="0" * 64)


def test_official_checksums_reject_other_files(tiny_data, tmp_path):
    cfg = data_cfg(root=str(tiny_data), cache_dir=str(tmp_path / "c"), download=False)
    with pytest.raises(DataError, match="checksum mismatch"):
        data.load(cfg)


def test_lookup_order_root_then_cache_then_system(tmp_path, monkeypatch):
    root, cache, system = tmp_path / "root", tmp_path / "cache", tmp_path / "system"
    for d in (cache, system):
        write_idx(d)
    monkeypatch.setattr(data, "SYSTEM_DIR", system)
    assert data.locate(None, str(cache), False, "") == cache
    write_idx(root)
    assert data.locate(str(root), str(cache), False, "") == root
    assert data.locate(None, str(tmp_path / "empty"), False, "") == system


def test_missing_data_without_download_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="not found in .*apt-get|dataset-fashion-mnist"):
        data.locate(None, str(tmp_path / "cache"), False, "")


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server serving freshly written IDX files."""
    served = tmp_path / "served"
    checksums = write_idx(served)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", checksums
    server.shutdown()


def test_downloads_from_mirror_and_verifies(mirror, tmp_path, monkeypatch):
    url, checksums = mirror
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "nowhere")
    cache = tmp_path / "cache"
    folder = data.locate(None, str(cache), True, url, checksums)
    assert folder == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(n for n, _ in FILES.values())
    arrays, _ = data.decode(folder, str(cache), checksums)
    assert arrays["train_images"].shape == (100, 28, 28)


def test_download_with_wrong_checksum_keeps_nothing(mirror, tmp_path):
    url, checksums = mirror
    bad = dict(checksums, **{"train-images-idx3-ubyte.gz": "f" * 64})
    with pytest.raises(DataError, match="downloaded .*train-images-idx3-ubyte.gz is bad: .*checksum"):
        data.download(url, tmp_path / "dl", bad, progress=False)
    assert not (tmp_path / "dl" / "train-images-idx3-ubyte.gz").exists()
    assert not list((tmp_path / "dl").glob("*.part"))


def test_unreachable_mirror_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"could not download http://127.0.0.1:9/t.*Fix: check the network"):
        data.download("http://127.0.0.1:9/", tmp_path / "dl", progress=False)


def test_second_load_uses_decoded_cache(tiny_data, tmp_path, monkeypatch):
    cfg = data_cfg(root=str(tiny_data), cache_dir=str(tmp_path / "c"), download=False, verify=False,
                   val_fraction=0.2)
    first = data.load(cfg)
    monkeypatch.setattr(data, "read_idx", lambda *a, **k: pytest.fail("gz parsed again"))
    second = data.load(cfg)
    assert first.checksum == second.checksum
    assert torch.equal(first.train.x, second.train.x)


def test_splits_are_stratified_seeded_and_disjoint(tiny_data, tmp_path):
    cfg = data_cfg(root=str(tiny_data), cache_dir=str(tmp_path / "c"), download=False, verify=False,
                   val_fraction=0.2, train_fraction=0.5)
    d = data.load(cfg)
    assert len(d.val) == 20 and len(d.train) == 40 and len(d.test) == 60
    assert torch.bincount(d.val.y).tolist() == [2] * 10
    assert torch.bincount(d.train.y).tolist() == [4] * 10
    assert d.train.x.dtype == torch.float32 and d.train.x.shape[1:] == (1, 28, 28)
    assert 0 <= d.train.x.min() and d.train.x.max() <= 1
    # no training image is also a validation image
    train_rows = {bytes(r) for r in (d.train.x * 255).round().to(torch.uint8).flatten(1).numpy()}
    assert not train_rows & {bytes(r) for r in (d.val.x * 255).round().to(torch.uint8).flatten(1).numpy()}
    again = data.load(cfg)
    assert torch.equal(d.val.y, again.val.y) and torch.equal(d.val.x, again.val.x)


def test_batches_cover_every_image_once_in_seeded_order(tiny_data, tmp_path):
    cfg = data_cfg(root=str(tiny_data), cache_dir=str(tmp_path / "c"), download=False, verify=False)
    split = data.load(cfg).train
    ys = [y for _, y in split.batches(32, torch.Generator().manual_seed(1))]
    assert [len(y) for y in ys][:-1] == [32] * (len(ys) - 1)
    assert sorted(torch.cat(ys).tolist()) == sorted(split.y.tolist())
    ys2 = [y for _, y in split.batches(32, torch.Generator().manual_seed(1))]
    assert all(torch.equal(a, b) for a, b in zip(ys, ys2))
