"""Command line: ``python -m fmnist_sweep [--cfg] [--verbose] key=value ...``."""

from __future__ import annotations

import os
import sys
import time

USAGE = """usage: python -m fmnist_sweep [options] [override ...]

Train one model with the configuration Hydra composes from conf/ and the
overrides (key=value, group=option), recording the run in MLflow.

examples:
  python -m fmnist_sweep
  python -m fmnist_sweep model=bilstm optimizer=adam optimizer.lr=0.01 trainer.epochs=3
  python -m fmnist_sweep model=autoencoder model.latent_dim=128 trainer.precision=fp32

options:
  --cfg        print the composed configuration and exit
  --verbose    show full tracebacks on errors (also HYDRA_FULL_ERROR=1)
  -h, --help   this text
"""


def _browse_hint(tracking_uri: str) -> str:
    if tracking_uri.startswith("sqlite:///"):
        return f"browse: mlflow ui --backend-store-uri {tracking_uri}  (then open http://127.0.0.1:5000)"
    return f"browse: {tracking_uri}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    show_cfg = "--cfg" in argv
    overrides = [a for a in argv if a not in ("--verbose", "--cfg")]
    unknown = [a for a in overrides if a.startswith("-")]
    from .errors import UserError

    try:
        if unknown:
            raise UserError(f"unknown option {unknown[0]}; see --help")
        from .config import compose

        cfg = compose(overrides)
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        from .train import run

        t0 = time.perf_counter()
        result = run(cfg, overrides)
    except UserError as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the MLflow run is marked KILLED", file=sys.stderr)
        return 130
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                      if k.startswith(("val/", "test/")))
    print(f"run {result.run_id} {result.status} in {time.perf_counter() - t0:.1f} s: {shown}")
    if result.status != "FINISHED":
        print(f"error: {result.message}", file=sys.stderr)
    from .tracking import local_uri

    print(_browse_hint(local_uri(cfg.tracking.uri)))
    return 0 if result.status == "FINISHED" else 1
