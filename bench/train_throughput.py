"""Training images/s of our engine vs a PyTorch-tutorial-style loop, side by side.

Engine: the whole split as one tensor, batches by index slicing, fmnist_sweep.train.train_epoch
(bf16 autocast and channels_last where chosen). Baseline: a torch Dataset that converts
each uint8 image per item + DataLoader(shuffle=True), fp32, as the tutorials write it.
Same model, batch size and threads; windows interleaved, medians reported.

    python bench/train_throughput.py                 # all families, ~5 min on 2 cores
    python bench/train_throughput.py --quick         # tiny, to check it runs
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from hydra.utils import instantiate

from fmnist_sweep.config import compose
from fmnist_sweep.data import Split
from fmnist_sweep.train import cpu_has_fast_bf16, threads_for, train_epoch

BATCH = {"cnn": 100, "rnn": 65, "bilstm": 64, "autoencoder": 100, "encoder_classifier": 100}


class TutorialDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).float().div(255).unsqueeze(0), int(self.labels[i])


def build(name):
    torch.manual_seed(0)
    cfg = compose([f"model={name}"])
    model = instantiate(cfg.model)
    return model, instantiate(cfg.optimizer)(model.parameters())


def engine_rate(name, images, labels, precision):
    model, opt = build(name)
    cl = getattr(model, "channels_last_gain", False) and precision == "bf16"
    if cl:
        model.to(memory_format=torch.channels_last)
    split = Split(torch.from_numpy(images).unsqueeze(1).float().div(255), torch.from_numpy(labels))
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    warm = Split(split.x[: BATCH[name] * 2], split.y[: BATCH[name] * 2])
    train_epoch(model, opt, warm, BATCH[name], torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    t = time.perf_counter()
    train_epoch(model, opt, split, BATCH[name], torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    return len(labels) / (time.perf_counter() - t)


def baseline_rate(name, images, labels):
    model, opt = build(name)
    model.train()
    loader = torch.utils.data.DataLoader(TutorialDataset(images, labels), batch_size=BATCH[name], shuffle=True)
    t, first = None, True
    for x, y in loader:
        if first:  # the first batch is warm-up, as for the engine
            t, first = time.perf_counter(), False
            n = 0
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BATCH))
    ap.add_argument("--images", type=int, default=3000, help="images per timed window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--quick", action="store_true", help="200 images, 1 window: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.images, args.windows = 200, 1
    torch.set_num_threads(threads_for(args.threads))
    rng = np.random.default_rng(0)
    # Throughput does not depend on pixel values: random images of the real shape.
    images = rng.integers(0, 256, size=(args.images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.images).astype(np.int64)
    print(f"threads {torch.get_num_threads()}, {args.images} images x {args.windows} windows, "
          f"CPU fast bf16: {cpu_has_fast_bf16()}")
    print(f"{'model':<20}{'baseline fp32':>14}{'engine fp32':>13}{'engine bf16':>13}{'fp32 ratio':>12}{'bf16 ratio':>12}")
    for name in args.models.split(","):
        rates = {"base": [], "fp32": [], "bf16": []}
        for _ in range(args.windows):  # interleaved so machine noise hits all three alike
            rates["base"].append(baseline_rate(name, images, labels))
            rates["fp32"].append(engine_rate(name, images, labels, "fp32"))
            rates["bf16"].append(engine_rate(name, images, labels, "bf16"))
        m = {k: statistics.median(v) for k, v in rates.items()}
        print(f"{name:<20}{m['base']:>14,.0f}{m['fp32']:>13,.0f}{m['bf16']:>13,.0f}"
              f"{m['fp32'] / m['base']:>11.2f}x{m['bf16'] / m['base']:>11.2f}x", flush=True)
    print("images/s, training (forward + backward + optimizer step); ratio = engine / baseline")


if __name__ == "__main__":
    main()
