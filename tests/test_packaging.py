"""A non-editable wheel carries conf/ and sweeps/ and composes from them."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_composes_from_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("fmnist_sweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("fmnist_sweep/conf/")}
    expected = {"fmnist_sweep/" + str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and expected <= shipped
    assert any(n.startswith("fmnist_sweep/sweeps/") for n in names) == any((ROOT / "sweeps").glob("*.yaml"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Run from elsewhere with only the unpacked wheel on the path: the repo's conf/ is out of reach.
    code = ("import fmnist_sweep.config as c; "
            "print(c.resource_dir('conf')); print(c.compose(['model=rnn']).model._target_)")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert out == [str(site / "fmnist_sweep" / "conf"), "fmnist_sweep.models.rnn.RNN"]
