"""The training loop: build a configuration's data, model and optimizer, fit it epoch by
epoch (train, evaluate, report), evaluate a split. Where it computes comes from hardware;
what it records in MLflow is record's."""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import checkpoints
from . import data as fmnist
from .errors import UserError, raise_if_stopped
from .hardware import compile_for_training, select_device, select_precision

@dataclass
class RunResult:
    status: str            # MLflow run status: FINISHED, FAILED, or KILLED (pruned / interrupted)
    run_id: str
    monitor: str           # the metric model selection uses, e.g. "val/accuracy"
    best: float | None     # its best value over the epochs
    metrics: dict = field(default_factory=dict)   # last epoch's metrics, then test/*
    history: list = field(default_factory=list)   # one dict of metrics per epoch
    message: str = ""
    traceback: str = ""    # of an unexpected error, for --verbose
    model_id: str | None = None  # the MLflow Model the run logged (models:/ID), if it logged one
    experiment_id: str = ""

_DATA: dict = {}


def dataset(cfg_data: DictConfig, device: torch.device) -> fmnist.FashionMNIST:
    """The splits on the device, kept for the life of the process (a worker's next
    trial on the same data does not decode again)."""
    key = (OmegaConf.to_yaml(cfg_data), str(device))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = fmnist.load(cfg_data, device)
    return _DATA[key]

class Diverged(Exception):
    pass


def train_epoch(model, optimizer, split, batch_size, generator, autocast, channels_last, on_batch,
                scheduler=None, augment=None):
    """One pass over the training split; returns the mean loss (read once, at the end)."""
    model.train()
    loss_sum = torch.zeros((), device=split.x.device)
    for step, (x, y) in enumerate(split.batches(batch_size, generator)):
        raise_if_stopped()
        if augment:
            x = fmnist.augment(x, **augment)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(y)
        if step % 25 == 0:  # a sync every 25 steps: progress display and divergence check
            value = loss.item()
            if not math.isfinite(value):
                raise Diverged(f"training loss became {value} at step {step}")
            on_batch(step, value)
        else:
            on_batch(step, None)
    mean = loss_sum.item() / len(split)
    if not math.isfinite(mean):
        raise Diverged(f"training loss became {mean}")
    return mean


def augment_args(tcfg) -> dict | None:
    """``trainer.augment``'s settings that are on, as fmnist.augment's keywords (None: no augmentation)."""
    return {k: v for k, v in OmegaConf.to_container(tcfg.augment).items() if v} or None


def tta_views(x: torch.Tensor, flip: bool, shift: int) -> list[torch.Tensor]:
    """A batch's test-time views: itself, its mirror (``flip``), and each of those moved
    ``shift`` pixels left, right, up and down (zero fill)."""
    views = [x, x.flip(3)] if flip else [x]
    if shift:
        pad, s2 = torch.nn.functional.pad, 2 * shift
        for v in list(views):
            p = pad(v, (shift, shift, shift, shift))
            views += [p[..., shift:-shift, :-s2], p[..., shift:-shift, s2:], p[..., :-s2, shift:-shift],
                      p[..., s2:, shift:-shift]]
    return views


@torch.no_grad()
def evaluate(model, split, batch_size, autocast, channels_last, keep_outputs=False, flip=False, shift=0):
    """Loss (and accuracy for classifiers) over a split in large no-grad batches; a
    classifier's logits averaged over the test-time views of ``flip`` and ``shift`` (tta_views)."""
    model.eval()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    outputs = []
    for x, y in split.batches(batch_size):
        raise_if_stopped()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            out, loss = model(x, y)
            if (flip or shift) and model.task == "classify":
                others = tta_views(x, flip, shift)[1:]
                out = (out.float() + sum(model(v, y)[0].float() for v in others)) / (1 + len(others))
                loss = torch.nn.functional.cross_entropy(out, y)
        loss_sum += loss.float() * len(y)
        if model.task == "classify":
            pred = out.argmax(1)
            correct += (pred == y).sum()
            if keep_outputs:
                outputs.append(pred.cpu())
        elif keep_outputs and not outputs:
            outputs.append(out.float().cpu())  # the first batch's reconstructions suffice
    result = {"loss": loss_sum.item() / len(split)}
    if model.task == "classify":
        result["accuracy"] = correct.item() / len(split)
    if keep_outputs:
        result["outputs"] = torch.cat(outputs).numpy()
    return result


def make_optimizer(cfg_optimizer: DictConfig, params):
    """The configured optimizer in its fused (one kernel for all parameters) or foreach (batched)
    implementation where torch has one: torch's CPU default's mathematics in fewer ops per step."""
    params = list(params)
    partial = instantiate(cfg_optimizer)
    for fast in ({"fused": True}, {"foreach": True}):
        try:
            return partial(params, **fast)
        except (TypeError, RuntimeError, ValueError):
            continue
    return partial(params)


def make_scheduler(name: str, optimizer, total_steps: int):
    """The per-batch learning-rate schedule ``trainer.lr_schedule`` names (None: constant)."""
    if name == "onecycle" and total_steps >= 4:  # (fewer steps than its two phases need: cosine)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps + 1,
            pct_start=max(0.25, 1.5 / total_steps))  # + 1: its own first step, at construction
    if name in ("cosine", "onecycle"):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


@dataclass
class Built:
    """What build() makes of a config: the data on the device, the model and its optimizer,
    the precision, and the metric that selects the best epoch."""

    cfg: DictConfig
    device: torch.device
    data: fmnist.FashionMNIST
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: str
    channels_last: bool
    monitor: str
    maximize: bool
    ema: torch.nn.Module | None = None  # trainer.ema: the weights' moving average (AveragedModel)
    compiled: torch.nn.Module | None = None  # trainer.compile: the model as torch.compile traced it

    @property
    def trained(self) -> torch.nn.Module:
        """The model the training steps call: the compiled one where trainer.compile is on (same parameters)."""
        return self.compiled if self.compiled is not None else self.model

    @property
    def evaluated(self) -> torch.nn.Module:
        """The model that is evaluated: the moving average of the weights where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()


def build(cfg: DictConfig, pretrained: str | None = None) -> Built:
    """Config -> data, model, optimizer, precision.
    ``pretrained``: the state_dict file of model.pretrained, already resolved (record.pretrained)."""
    device = select_device(cfg.trainer.device)
    data = dataset(cfg.data, device)
    if not len(data.train):
        raise UserError(f"data.train_fraction={cfg.data.train_fraction} leaves no training image: raise it.")
    model_kwargs = {"pretrained": pretrained} if "pretrained" in cfg.model else {}
    torch.manual_seed(cfg.seed)
    try:
        model = instantiate(cfg.model, **model_kwargs)
        model.to(device)
        optimizer = make_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    except Exception as e:  # hydra wraps bad constructor arguments
        raise UserError(f"cannot build the model/optimizer: {str(e).splitlines()[0]}") from None
    channels_last = bool(cfg.trainer.channels_last if cfg.trainer.channels_last != "auto"
                         else getattr(model, "channels_last_gain", False))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    monitor, maximize = ("val/accuracy", True) if model.task == "classify" else ("val/loss", False)
    ema = None
    if cfg.trainer.get("ema"):  # BatchNorm's running statistics are averaged too (use_buffers)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.trainer.ema), use_buffers=True)
    return Built(cfg, device, data, model, optimizer, select_precision(cfg.trainer.precision, device, model),
                 channels_last, monitor, maximize, ema, compile_for_training(model, cfg.trainer.get("compile")))

def fit(b: Built, result: RunResult, log, report=None, save=None, resume: dict | None = None) -> None:
    """The epoch loop: train, evaluate, log(epoch, metrics), save(checkpoint) (checkpoints.py),
    report (True: prune), early stop. ``resume``: a checkpoint to go on from, at its next epoch.
    Fills ``result`` (history, best; status KILLED when pruned); the best epoch's weights
    are loaded back when early stopping is on. No epoch starts past ``trainer.deadline`` minus
    the last epoch's duration: the run ends KILLED, cut short. With ``trainer.ema`` the moving
    average of the weights is evaluated every epoch, and is the model at the end."""
    tcfg = b.cfg.trainer
    generator = torch.Generator().manual_seed(b.cfg.seed)
    n_batches = math.ceil(len(b.data.train) / tcfg.batch_size)
    scheduler = make_scheduler(tcfg.lr_schedule, b.optimizer, tcfg.epochs * n_batches)
    augment = augment_args(tcfg)
    first, stale, best_state = checkpoints.restore(b, resume, generator, scheduler, result) if resume else (1, 0, None)
    deadline, last = (float(tcfg.deadline) if tcfg.get("deadline") else None), 0.0
    with _progress(tcfg.progress) as bar:
        for epoch in range(first, tcfg.epochs + 1):
            if deadline is not None and time.time() + last > deadline:  # this epoch would end past it
                result.status, result.message = "KILLED", f"cut short at the deadline after epoch {epoch - 1}"
                return
            t0 = time.perf_counter()
            metrics = _epoch(b, bar, epoch, n_batches, generator, scheduler, augment)
            last = time.perf_counter() - t0
            log(epoch, metrics)
            result.history.append({"epoch": epoch, **metrics})
            result.metrics = dict(metrics)
            value = metrics.get(b.monitor)
            if value is not None and (result.best is None or (value > result.best if b.maximize
                                                              else value < result.best)):
                result.best, stale = value, 0
                if tcfg.early_stopping_patience:
                    best_state = copy.deepcopy(b.evaluated.state_dict())
            else:
                stale += 1
            if save is not None:
                save(checkpoints.state(b, epoch, generator, scheduler, result, stale, best_state))
            # The last epoch is paid for: its value is reported, its result kept.
            if report is not None and report(epoch, metrics) and epoch < tcfg.epochs:
                result.status, result.message = "KILLED", f"pruned after epoch {epoch}"
                return
            if tcfg.early_stopping_patience and stale >= tcfg.early_stopping_patience:
                if tcfg.progress:
                    bar.console.print(f"early stop: {b.monitor} has not improved for {stale} epochs")
                break
    if best_state is not None or b.ema is not None:  # the evaluated weights are tested and saved
        b.model.load_state_dict(best_state if best_state is not None else b.ema.module.state_dict())


def _epoch(b: Built, bar, epoch: int, n_batches: int, generator, scheduler, augment) -> dict:
    """One epoch: train, then evaluate on the validation split; its metrics (printed on a terminal)."""
    tcfg = b.cfg.trainer
    task = bar.add_task(f"epoch {epoch}/{tcfg.epochs}", total=n_batches, stats="")

    def on_batch(step, loss):
        if b.ema is not None:
            b.ema.update_parameters(b.model)
        bar.update(task, advance=1, **({"stats": f"loss {loss:.4f}"} if loss is not None else {}))

    t0 = time.perf_counter()
    train_loss = train_epoch(b.trained, b.optimizer, b.data.train, tcfg.batch_size, generator, b.autocast,
                             b.channels_last, on_batch, scheduler, augment)
    train_seconds = time.perf_counter() - t0
    metrics = {"train/loss": train_loss}
    if len(b.data.val):  # empty when retraining on train+val for a final model
        val = evaluate(b.evaluated, b.data.val, tcfg.eval_batch_size, b.autocast, b.channels_last, flip=tcfg.eval_flip)
        if not math.isfinite(val["loss"]):
            raise Diverged(f"validation loss became {val['loss']}")
        metrics.update({f"val/{k}": v for k, v in val.items()})  # loss, and a classifier's accuracy
    bar.remove_task(task)
    metrics.update({"lr": b.optimizer.param_groups[0]["lr"], "perf/images_per_s": len(b.data.train) / train_seconds,
                    "perf/epoch_seconds": time.perf_counter() - t0})
    if tcfg.progress:
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("train", "val")))
        bar.console.print(f"epoch {epoch}/{tcfg.epochs}  {shown}  {metrics['perf/images_per_s']:,.0f} img/s  "
                          f"{metrics['perf/epoch_seconds']:.1f} s", soft_wrap=True)
    return metrics
