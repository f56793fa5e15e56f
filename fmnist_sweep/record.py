"""A run's MLflow record: one configuration trained (train.build, train.fit) as one MLflow
run with its parameters, tags, dataset inputs, per-epoch metrics, final evaluation,
artifacts and MLflow Model. The single-run CLI, a study's trial and the tests all come
through run()."""

from __future__ import annotations

import shlex
import tempfile
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoints, hardware, served, train
from .config import compose, config_fingerprint, validate
from .errors import StorageLost, UserError, stop_name, stops_deferred
from .models import count_params
from .models.fast import private_ops_allowed
from .tracking import Tracker, git_commit, resolve_checkpoint
from .train import Built, Diverged, RunResult

def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run(cfg: DictConfig, overrides=(), report=None, parent_run_id: str | None = None,
        tags: dict | None = None, tracker: Tracker | None = None, name: str | None = None,
        log_model=True, checkpoint: str = "off", resume: tuple[str, dict] | None = None,
        opened=None) -> RunResult:
    """Train ``cfg`` and record it as one MLflow run: build, fit, record.

    ``report(epoch, metrics) -> bool`` is called after every epoch; True stops the run as
    pruned (status KILLED). A study passes its own ``tracker`` (its experiment) and parent run.
    ``log_model``: whether a finished run logs its MLflow Model, or a function of the
    RunResult (its final metrics) that says so. ``checkpoint`` (study.checkpoints): each epoch
    saved for a retry (delete: removed once the run ends, keep, off); ``resume``: (a stopped
    run's id, its checkpoint) to go on from, its epochs' metrics copied into this run;
    ``opened(run_id)``: told the run's id as soon as it is made (a study's recovery)."""
    validate(cfg)
    t_start = time.perf_counter()
    hardware.prepare(cfg.trainer.threads)
    # The tracking store first: an unreachable server fails the run before any work.
    tracker = tracker or Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    ref = pretrained(cfg, overrides, tracker, parent_run_id)
    t_build = time.perf_counter()
    b = train.build(cfg, ref)
    t_build = time.perf_counter() - t_build
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    params["model.n_params"] = count_params(b.model)
    if resume is not None:
        tags = {**(tags or {}), "fmnist.resumed_from_run": resume[0], "fmnist.resumed_at_epoch": resume[1]["epoch"]}
    with stops_deferred():  # (a stop as the run is made waits until its id is told)
        run_id = tracker.start(name or shlex.join(overrides) or "default", params, _run_tags(b, overrides, tags),
                               parent_run_id)
        if opened is not None:
            opened(run_id)
    result = RunResult("RUNNING", run_id, b.monitor, None, experiment_id=tracker.experiment_id)
    try:  # (from the run's start: a stop or error as its inputs are logged ends it too)
        tracker.log_datasets(run_id, _inputs(b), b.data.source)
        for h in resume[1]["history"] if resume is not None else []:
            tracker.log(run_id, {k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])
        fingerprint = config_fingerprint(b.cfg)  # once per run: an epoch's checkpoint carries it
        save = ((lambda state: checkpoints.save(tracker, run_id, {**state, "fingerprint": fingerprint}))
                if checkpoint != "off" else None)
        train.fit(b, result, lambda epoch, metrics: tracker.log(run_id, metrics, step=epoch), report, save,
                  resume[1] if resume is not None else None)
        if result.status == "KILLED":
            tracker.log(run_id, {}, tags={"fmnist.pruned": "true", "fmnist.stopped": result.message})
        else:
            _record_final(b, tracker, result, {"perf/train_seconds": time.perf_counter() - t_start,
                                               "perf/build_seconds": t_build,
                                               "model/n_params": params["model.n_params"]}, log_model)
            result.status = "FINISHED"
        if checkpoint == "delete":  # the run ended: no retry will resume it
            for finished in (run_id, *([resume[0]] if resume is not None else [])):
                checkpoints.delete(tracker, finished)
        tracker.end(run_id, result.status)
        return result
    except (StorageLost, KeyboardInterrupt) as e:  # not the run's failure: a study re-queues its trial
        why = str(e) if isinstance(e, StorageLost) else f"interrupted ({stop_name(e)})"
        tracker.log(run_id, {}, tags={"fmnist.failure": why})
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
    t = time.perf_counter()
    ev = train.evaluate(b.model, split, tcfg.eval_batch_size, b.autocast, b.channels_last, keep_outputs=True,
                  flip=tcfg.eval_flip, shift=tcfg.test_shift if split_name == "test" else 0)
    final["perf/test_seconds"] = time.perf_counter() - t
    if split_name == "test":
        final["test/loss"] = ev["loss"]
        if b.model.task == "classify":
            final["test/accuracy"] = ev["accuracy"]
    # The phases' seconds are logged with the final metrics (bench/single_run.py prints them).
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _write_artifacts(Path(tmp), b.cfg, b.model, result.history, ev, split, split_name)
        tracker.log_artifacts(result.run_id, Path(tmp))
    final["perf/artifacts_seconds"] = time.perf_counter() - t
    tracker.log(result.run_id, final, step=len(result.history))
    result.metrics.update(final)
    if log_model(result) if callable(log_model) else log_model:
        t = time.perf_counter()
        result.model_id = served.log(tracker, result.run_id, b.model, served.as_pixels(split.x[:2]),
                                     step=len(result.history))
        model = {"perf/model_seconds": time.perf_counter() - t}  # a request more, only beside an export
        tracker.log(result.run_id, model, step=len(result.history))
        result.metrics.update(model)


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


def pretrained(cfg, overrides, tracker: Tracker, parent_run_id) -> str | None:
    """model.pretrained as a local state_dict path: scratch/null -> None; a path or run
    id as given; ``autoencoder`` -> an autoencoder of this encoder's shape, trained on
    the same data with the same trainer (reused if this store has one finished)."""
    ref = cfg.model.get("pretrained")
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
    plots = cfg.tracking.get("plots", True)
    if plots:
        artifacts.learning_curves_png(history, out / "learning_curves.png")
    if model.task == "classify":
        y = split.y.cpu().numpy()
        artifacts.per_class_table(y, ev["outputs"], out, split_name)
        acc = float((ev["outputs"] == y).mean())
        if plots:
            artifacts.confusion_matrix_png(y, ev["outputs"], out / f"confusion_matrix_{split_name}.png",
                                           f"{split_name} set, accuracy {acc:.4f}")
    elif plots:
        n = min(10, len(ev["outputs"]))
        artifacts.reconstructions_png(split.x[:n].float().cpu().numpy(), ev["outputs"][:n],
                                      out / f"reconstructions_{split_name}.png")
