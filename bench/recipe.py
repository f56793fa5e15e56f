"""Which changes to the residual CNN's recipe pay for themselves? +experiment=best's first
recipe trained with and without each change, seeds in parallel processes (one per core,
one thread each); validation accuracy mean ± std over the seeds and seconds per epoch.

Trained changes (a run each): a higher learning rate and no weight decay for BatchNorm
parameters (``bn``). Evaluation changes (read off the same runs): test-time augmentation
(mirror; mirror and 1-pixel shifts) and an exponential moving average of the weights (EMA,
torch's AveragedModel) at two decays.

    python bench/recipe.py                         # 30% of the training images, 10 epochs, seeds 0,1
    python bench/recipe.py --epochs 20 data.train_fraction=1.0
    python bench/recipe.py --quick                 # tiny: checks it runs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

RECIPE = ["+experiment=best", "model.label_smoothing=0.1", "model.dropout=0.229", "optimizer.lr=0.0088",
          "optimizer.weight_decay=0.013", "trainer.batch_size=64", "trainer.augment.erase=0.25",
          "trainer.progress=false", "trainer.deadline=null"]
DECAYS = (0.99, 0.999)
TRAINED = {"recipe": {}, "bn lr x3, no decay": {"bn_lr": 3.0}}


def accuracy(b, model, views: str) -> tuple[float, float]:
    """Validation accuracy of ``model`` with views none / flip / flip+shift (train.evaluate), and its seconds."""
    from fmnist_sweep import train

    t0 = time.perf_counter()
    ev = train.evaluate(model, b.data.val, 1000, b.autocast, b.channels_last, flip=views != "none",
                        shift=int(views == "flip+shift"))
    return ev["accuracy"], time.perf_counter() - t0


def _optimizer(b, bn_lr: float):
    """AdamW with the BatchNorm parameters in their own group: lr x ``bn_lr``, no weight decay."""
    import torch

    bn = [p for m in b.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    ids = {id(p) for p in bn}
    rest = [p for p in b.model.parameters() if id(p) not in ids]
    lr, wd = b.optimizer.defaults["lr"], b.optimizer.defaults["weight_decay"]
    return torch.optim.AdamW([{"params": rest}, {"params": bn, "lr": lr * bn_lr, "weight_decay": 0.0}],
                             lr=lr, weight_decay=wd, fused=True)


def train_one(overrides: list[str], seed: int, bn_lr: float | None = None) -> dict:
    """One run of the recipe; the validation accuracy of each evaluation change, and costs."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from fmnist_sweep import train
    from fmnist_sweep.config import compose
    from fmnist_sweep.hardware import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    b = train.build(compose([*RECIPE, *overrides, f"seed={seed}"]))
    if bn_lr:
        b.optimizer = _optimizer(b, bn_lr)
    tcfg = b.cfg.trainer
    emas = {d: AveragedModel(b.model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True) for d in DECAYS}
    ema_seconds = [0.0]

    def on_batch(*_):
        t0 = time.perf_counter()
        for m in emas.values():
            m.update_parameters(b.model)
        ema_seconds[0] += time.perf_counter() - t0

    n_batches = -(-len(b.data.train) // tcfg.batch_size)
    scheduler = train.make_scheduler(tcfg.lr_schedule, b.optimizer, tcfg.epochs * n_batches)
    augment = train.augment_args(tcfg)
    gen, t0 = torch.Generator().manual_seed(seed), time.perf_counter()
    for _ in range(tcfg.epochs):
        train.train_epoch(b.model, b.optimizer, b.data.train, tcfg.batch_size, gen, b.autocast, b.channels_last,
                          on_batch, scheduler, augment)
    epoch = (time.perf_counter() - t0 - ema_seconds[0]) / tcfg.epochs
    out = {"epoch_s": epoch, "ema_s": ema_seconds[0] / tcfg.epochs / len(DECAYS)}
    for views in ("none", "flip", "flip+shift"):
        out[views], out[f"{views}_s"] = accuracy(b, b.model, views)
    for d, m in emas.items():
        out[f"ema {d}"], _ = accuracy(b, m.module, "none")
        out[f"ema {d} + flip"], _ = accuracy(b, m.module, "flip")
    return out


def rows(results: dict) -> list[tuple[str, list[float], float, float]]:
    """(change, validation accuracies over seeds, training s/epoch, validation evaluation s) for the table."""
    out = []
    for name, runs in results.items():
        base = statistics.mean(r["epoch_s"] for r in runs)
        ev = {v: statistics.mean(r[f"{v}_s"] for r in runs) for v in ("none", "flip", "flip+shift")}
        label = "" if name == "recipe" else f"{name}: "
        out.append((f"{label}no test-time augmentation", [r["none"] for r in runs], base, ev["none"]))
        out.append((f"{label}TTA mirror", [r["flip"] for r in runs], base, ev["flip"]))
        out.append((f"{label}TTA mirror + 1-px shifts", [r["flip+shift"] for r in runs], base, ev["flip+shift"]))
        if name == "recipe":
            ema = statistics.mean(r["ema_s"] for r in runs)
            for d in DECAYS:
                out.append((f"EMA {d}", [r[f"ema {d}"] for r in runs], base + ema, ev["none"]))
                out.append((f"EMA {d} + TTA mirror", [r[f"ema {d} + flip"] for r in runs], base + ema, ev["flip"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fmnist-recipe-")
    os.environ["FMNIST_SWEEP_DIR"] = work
    quick = ["data.train_fraction=0.01", "data.val_fraction=0.05", "trainer.epochs=1"] if args.quick else []
    over = [f"trainer.epochs={args.epochs}", *quick, *args.overrides]  # the command line's overrides win
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    cores = len(os.sched_getaffinity(0))
    print(f"recipe bench: {over}, seeds {seeds}, {cores} processes of 1 thread", flush=True)
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(name, s): pool.submit(train_one, over, s, **kw) for name, kw in TRAINED.items() for s in seeds}
        results = {name: [futures[name, s].result() for s in seeds] for name in TRAINED}
    print(f"\n| change | val accuracy (mean ± std, {len(seeds)} seeds) | training s/epoch | validation s |"
          "\n|---|---|---|---|")
    for change, accs, seconds, ev in rows(results):
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {change} | {statistics.mean(accs):.4f} ± {std:.4f} | {seconds:.1f} | {ev:.1f} |")


if __name__ == "__main__":
    main()
