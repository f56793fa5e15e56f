"""Train one configuration end to end and record it in MLflow. The single-run
CLI, a study's trial and the tests all come through run()."""

from __future__ import annotations

import copy
import ctypes
import math
import os
import shlex
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import data as fmnist
from . import served
from .config import compose, config_fingerprint, validate
from .errors import StorageLost, UserError
from .models import count_params, fuse_conv_activations
from .models.fast import cpuinfo_field, private_ops_allowed
from .tracking import Tracker, git_commit, resolve_checkpoint


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


def select_device(name: str) -> torch.device:
    """The torch device ``trainer.device`` names (auto: CUDA if present); CPU with a warning if CUDA is
    missing."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        if name != "auto":
            print(f"warning: trainer.device={name} but CUDA is not available here; training on cpu")
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_label(setting: str) -> str:
    """Where runs of this process train, for the record (no warnings printed)."""
    if setting == "cpu" or not torch.cuda.is_available():
        return "cpu"
    index = int(setting.split(":")[1]) if ":" in setting else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cuda:{index} ({torch.cuda.get_device_name(index)}" + (f", CUDA_VISIBLE_DEVICES={visible})" if visible else ")")


CPUINFO = "/proc/cpuinfo"


def cpu_bf16_slowdown(cpuinfo: str | None = None) -> str:
    """"" where bf16 autocast is real speed on this CPU, else why it is not. Fast: AMX tiles
    (Intel) and AVX512-BF16 on AMD (Zen 4 and 5: bf16 GEMM peaks about twice fp32's). Not fast:
    Intel's AVX512-BF16 without AMX (Cooper Lake, or a VM that hides AMX), where oneDNN's
    bf16 kernels run at about half the fp32 speed, and CPUs without bf16 units, where
    autocast emulates it (docs/PERFORMANCE.md). Read from /proc/cpuinfo, not timed, so a
    configuration trains the same way on every run."""
    cpuinfo = cpuinfo or CPUINFO
    flags = cpuinfo_field("flags", cpuinfo).split()
    if "amx_bf16" in flags or ("avx512_bf16" in flags and "AuthenticAMD" in cpuinfo_field("vendor_id", cpuinfo)):
        return ""
    if "avx512_bf16" in flags:
        return ("an Intel CPU with AVX512-BF16 but no AMX: its bf16 products run at about half "
                "the fp32 speed")
    return ("a CPU without bf16 units (AMX or AVX512-BF16): autocast emulates it (about 10x slower than fp32 "
            "on an AVX2-only CPU)")


def cpu_has_fast_bf16() -> bool:
    return not cpu_bf16_slowdown()


def select_precision(setting: str, device: torch.device, model) -> str:
    """fp32 or bf16 for this run: ``auto`` takes bf16 where the hardware makes it fast and the model gains."""
    if setting == "bf16" and device.type == "cpu" and (why := cpu_bf16_slowdown()):
        print(f"warning: trainer.precision=bf16 on {why}; precision=auto trains in fp32 here")
    if setting != "auto":
        return setting
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return "bf16" if fast and getattr(model, "bf16_gain", False) else "fp32"


def keep_freed_memory(keep: bool = True) -> bool:
    """glibc maps blocks over its mmap threshold (128 KB, raised as large blocks are
    freed) fresh from the OS and trims the heap past twice that, so a step's activation
    tensors are often page-faulted in afresh, which can double the cost of a small
    elementwise op. With ``keep`` the heap serves blocks up to 32 MB
    and is trimmed only past 512 MB free, so the next step reuses the same pages
    (PyTorch's CPU tuning guide gets the same by preloading jemalloc or tcmalloc).
    ``keep=False`` sets glibc's initial thresholds (128 KB) back, fixed: its adaptive
    default cannot be restored once changed.
    Returns False where there is no glibc mallopt (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mmap, trim = (32 << 20, 512 << 20) if keep else (128 << 10, 128 << 10)
    return bool(mallopt(m_mmap_threshold, mmap)) and bool(mallopt(m_trim_threshold, trim))


def threads_for(setting) -> int:
    """Threads for this process: the cores it may run on, unless set."""
    if setting != "auto":
        return int(setting)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_DATA: dict = {}


def dataset(cfg_data: DictConfig, device: torch.device) -> fmnist.FashionMNIST:
    """The splits on the device, kept for the life of the process (a worker's next
    trial on the same data does not decode again)."""
    key = (OmegaConf.to_yaml(cfg_data), str(device))
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = fmnist.load(cfg_data, device)
    return _DATA[key]


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Diverged(Exception):
    pass


def train_epoch(model, optimizer, split, batch_size, generator, autocast, channels_last, on_batch,
                scheduler=None, augment=None):
    """One pass over the training split; returns the mean loss (read once, at the end)."""
    model.train()
    loss_sum = torch.zeros((), device=split.x.device)
    for step, (x, y) in enumerate(split.batches(batch_size, generator)):
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
    """The configured optimizer, with its fused (one kernel for all parameters) or
    foreach (batched) implementation where torch has one: same mathematics, fewer ops
    per step than the per-parameter loop torch uses on a CPU by default."""
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


def build(cfg: DictConfig, overrides, tracker: Tracker, parent_run_id: str | None) -> Built:
    """Config -> data, model (CPU: conv + activation fused), optimizer, precision."""
    device = select_device(cfg.trainer.device)
    data = dataset(cfg.data, device)
    if not len(data.train):
        raise UserError(f"data.train_fraction={cfg.data.train_fraction} leaves no training image: raise it.")
    model_kwargs = {}
    if "pretrained" in cfg.model:
        model_kwargs["pretrained"] = _checkpoint(cfg, overrides, tracker, parent_run_id)
    torch.manual_seed(cfg.seed)
    try:
        model = instantiate(cfg.model, **model_kwargs)
        model.to(device)
        if device.type == "cpu":
            cpu_fast_paths(model, cfg.trainer.get("compile"))
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


def cpu_fast_paths(model: torch.nn.Module, compile_mode: str | None) -> None:
    """A CPU run's model: conv + tanh/ReLU as one oneDNN kernel (same parameters), unless
    torch.compile (trainer.compile) fuses its own: the two do not compose."""
    if not compile_mode:
        fuse_conv_activations(model)


def compile_for_training(model: torch.nn.Module, mode: str | None) -> torch.nn.Module | None:
    """``model`` wrapped by torch.compile in ``mode`` (trainer.compile: default, reduce-overhead =
    CUDA graphs, max-autotune), sharing its parameters; None when ``mode`` is null. Only the
    training steps call it: evaluation, export and the saved weights use ``model`` itself."""
    if not mode:
        return None
    return torch.compile(model, mode=None if mode == "default" else mode)


def fit(b: Built, result: RunResult, log, report=None) -> None:
    """The epoch loop: train, evaluate, log(epoch, metrics), report (True: prune), early stop.
    Fills ``result`` (history, best; status KILLED when pruned); the best epoch's weights
    are loaded back when early stopping is on. No epoch starts past ``trainer.deadline`` minus
    the last epoch's duration: the run ends KILLED, cut short. With ``trainer.ema`` the moving
    average of the weights is evaluated every epoch, and is the model at the end."""
    tcfg = b.cfg.trainer
    generator = torch.Generator().manual_seed(b.cfg.seed)
    n_batches = math.ceil(len(b.data.train) / tcfg.batch_size)
    scheduler = make_scheduler(tcfg.lr_schedule, b.optimizer, tcfg.epochs * n_batches)
    augment = augment_args(tcfg)
    best_state, stale = None, 0
    deadline, last = (float(tcfg.deadline) if tcfg.get("deadline") else None), 0.0
    with _progress(tcfg.progress) as bar:
        for epoch in range(1, tcfg.epochs + 1):
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
        metrics["val/loss"] = val["loss"]
        if b.model.task == "classify":
            metrics["val/accuracy"] = val["accuracy"]
    bar.remove_task(task)
    metrics.update({"lr": b.optimizer.param_groups[0]["lr"], "perf/images_per_s": len(b.data.train) / train_seconds,
                    "perf/epoch_seconds": time.perf_counter() - t0})
    if tcfg.progress:
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("train", "val")))
        bar.console.print(f"epoch {epoch}/{tcfg.epochs}  {shown}  {metrics['perf/images_per_s']:,.0f} img/s  "
                          f"{metrics['perf/epoch_seconds']:.1f} s", soft_wrap=True)
    return metrics


def run(cfg: DictConfig, overrides=(), report=None, parent_run_id: str | None = None,
        tags: dict | None = None, tracker: Tracker | None = None, name: str | None = None,
        log_model=True) -> RunResult:
    """Train ``cfg`` and record it as one MLflow run: build, fit, record.

    ``report(epoch, metrics) -> bool`` is called after every epoch; True stops the run as
    pruned (status KILLED). A study passes its own ``tracker`` (its experiment) and parent run.
    ``log_model``: whether a finished run logs its MLflow Model, or a function of the
    RunResult (its final metrics) that says so."""
    validate(cfg)
    t_start = time.perf_counter()
    torch.set_num_threads(threads_for(cfg.trainer.threads))
    keep_freed_memory()
    # The tracking store first: an unreachable server fails the run before any work.
    tracker = tracker or Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    b = build(cfg, overrides, tracker, parent_run_id)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    params["model.n_params"] = count_params(b.model)
    run_id = tracker.start(name or shlex.join(overrides) or "default", params, _run_tags(b, overrides, tags),
                           parent_run_id)
    tracker.log_datasets(run_id, _inputs(b), b.data.source)
    result = RunResult("RUNNING", run_id, b.monitor, None, experiment_id=tracker.experiment_id)
    try:
        fit(b, result, lambda epoch, metrics: tracker.log(run_id, metrics, step=epoch), report)
        if result.status == "KILLED":
            tracker.log(run_id, {}, tags={"fmnist.pruned": "true", "fmnist.stopped": result.message})
        else:
            _record_final(b, tracker, result, {"perf/train_seconds": time.perf_counter() - t_start,
                                               "model/n_params": params["model.n_params"]}, log_model)
            result.status = "FINISHED"
        tracker.end(run_id, result.status)
        return result
    except (StorageLost, KeyboardInterrupt) as e:  # not the run's failure: its study re-queues the trial
        if isinstance(e, StorageLost):
            tracker.log(run_id, {}, tags={"fmnist.failure": str(e)})
        tracker.end(run_id, "KILLED")
        raise
    except Exception as e:  # the run fails, the process hosting it (a study, a worker) goes on
        return _failed(b, tracker, result, e)


def _run_tags(b: Built, overrides, tags: dict | None) -> dict:
    """What the run's MLflow record says about how it was made, for reruns and comparisons."""
    line = shlex.join(overrides)
    return {"fmnist.model": b.cfg.model._target_.rsplit(".", 2)[-2], "fmnist.task": b.model.task,
            "fmnist.monitor": b.monitor, "fmnist.overrides": line,
            "fmnist.command": ("python -m fmnist_sweep " + line).strip(),
            "fmnist.device": str(b.device), "fmnist.precision": b.precision,
            "fmnist.channels_last": str(b.channels_last), "fmnist.threads": torch.get_num_threads(),
            "fmnist.cpu_fast_paths": str(b.device.type == "cpu" and private_ops_allowed() and b.compiled is None),
            "mlflow.source.git.commit": git_commit(), "data.sha256": b.data.checksum,
            "fmnist.fingerprint": config_fingerprint(b.cfg), **(tags or {})}


def _tested(b: Built) -> bool:
    """Whether the run's final evaluation is on the test split (asked, or no validation split)."""
    return bool(b.cfg.trainer.test or not len(b.data.val))


def _inputs(b: Built) -> dict:
    """The splits the run reads, by MLflow dataset context."""
    splits = {"training": b.data.train, "validation": b.data.val, "test": b.data.test if _tested(b) else []}
    return {context: split for context, split in splits.items() if len(split)}


def _record_final(b: Built, tracker: Tracker, result: RunResult, final: dict, log_model) -> None:
    """The finished run's last record: its best value, the test (or validation) evaluation,
    the artifacts (config, weights, curves, per-class tables or reconstructions) and, if
    ``log_model`` says so, the MLflow Model (its final metrics linked to it)."""
    tcfg = b.cfg.trainer
    if result.best is not None:
        final[f"best/{b.monitor}"] = result.best
    split_name = "test" if _tested(b) else "val"
    split = getattr(b.data, split_name)
    ev = evaluate(b.model, split, tcfg.eval_batch_size, b.autocast, b.channels_last, keep_outputs=True,
                  flip=tcfg.eval_flip, shift=tcfg.test_shift if split_name == "test" else 0)
    if split_name == "test":
        final["test/loss"] = ev["loss"]
        if b.model.task == "classify":
            final["test/accuracy"] = ev["accuracy"]
    tracker.log(result.run_id, final, step=len(result.history))
    result.metrics.update(final)
    with tempfile.TemporaryDirectory() as tmp:
        _write_artifacts(Path(tmp), b.cfg, b.model, result.history, ev, split, split_name)
        tracker.log_artifacts(result.run_id, Path(tmp))
    if log_model(result) if callable(log_model) else log_model:
        result.model_id = served.log(tracker, result.run_id, b.model, served.as_pixels(split.x[:2]),
                                     step=len(result.history))


def _failed(b: Built, tracker: Tracker, result: RunResult, e: Exception) -> RunResult:
    """A run that diverged or crashed: ended FAILED, with the reason in its record and the result."""
    if isinstance(e, Diverged):
        tracker.log(result.run_id, {}, tags={"fmnist.failure": str(e)})
        result.message = f"{e}: the run diverged. Try a smaller optimizer.lr (now {b.cfg.optimizer.lr})."
    else:
        detail = traceback.format_exc()
        if isinstance(e, torch.OutOfMemoryError):
            if b.device.type == "cuda":
                torch.cuda.empty_cache()  # so the worker's next trial starts with a clean device
            e = UserError(f"out of device memory at trainer.batch_size={b.cfg.trainer.batch_size}: "
                          "lower trainer.batch_size, or run fewer workers per GPU")
        tracker.log(result.run_id, {}, tags={"fmnist.failure": detail[-5000:]})
        result.message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        result.traceback = detail
    tracker.end(result.run_id, "FAILED")
    result.status = "FAILED"
    return result


def _checkpoint(cfg, overrides, tracker: Tracker, parent_run_id) -> str | None:
    """model.pretrained as a local state_dict path: scratch/null -> None; a path or run
    id as given; ``autoencoder`` -> an autoencoder of this encoder's shape, trained on
    the same data with the same trainer (reused if this store has one finished)."""
    ref = cfg.model.pretrained
    if ref is None or ref == "scratch":
        return None
    if ref != "autoencoder":
        return resolve_checkpoint(ref, cfg.tracking.uri)
    m = cfg.model
    line = [o for o in overrides if not o.lstrip("+~").startswith(("model", "optimizer", "sweep"))] + [
        "sweep=null", "model=autoencoder", f"model.latent_dim={m.latent_dim}", f"model.dropout={m.dropout}",
        f"model.channels=[{','.join(map(str, m.channels))}]", "optimizer=adam"]
    ae_cfg = compose(line)
    ae_cfg.trainer.progress = cfg.trainer.progress
    fp = config_fingerprint(ae_cfg)
    found = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`fmnist.fingerprint` = '{fp}' and attributes.status = 'FINISHED'",
        max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        print(f"pretraining an autoencoder for model.pretrained=autoencoder: python -m fmnist_sweep {shlex.join(line)}")
        result = run(ae_cfg, line, parent_run_id=parent_run_id, tracker=tracker, name="pretrain autoencoder",
                     tags={"fmnist.role": "pretraining"})
        if result.status != "FINISHED":
            raise UserError(f"pretraining the autoencoder failed: {result.message}")
        run_id = result.run_id
    return tracker.client.download_artifacts(run_id, "weights/state_dict.pt", tempfile.mkdtemp())


def _write_artifacts(out: Path, cfg, model, history, ev, split, split_name) -> None:
    """A finished run's files: config, weights, learning curves, and per-class tables or reconstructions."""
    from . import artifacts

    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (out / "weights").mkdir()  # beside, not inside, the logged MLflow Model "model"
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               out / "weights" / "state_dict.pt")
    artifacts.learning_curves_png(history, out / "learning_curves.png")
    if model.task == "classify":
        y = split.y.cpu().numpy()
        artifacts.per_class_table(y, ev["outputs"], out, split_name)
        acc = float((ev["outputs"] == y).mean())
        artifacts.confusion_matrix_png(y, ev["outputs"], out / f"confusion_matrix_{split_name}.png",
                                       f"{split_name} set, accuracy {acc:.4f}")
    else:
        n = min(10, len(ev["outputs"]))
        artifacts.reconstructions_png(split.x[:n].float().cpu().numpy(), ev["outputs"][:n],
                                      out / f"reconstructions_{split_name}.png")
