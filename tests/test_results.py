"""The reproduction presets, the stronger family and `compare`, on tiny data."""

import re
import statistics
import warnings

import optuna
import pytest
import torch
from optuna.trial import TrialState
from scipy import stats

from fmnist_sweep.cli import main
from fmnist_sweep.config import compose
from fmnist_sweep.data import augment
from fmnist_sweep.models import count_params
from fmnist_sweep.models.resnet import ResNet
from tests.helpers import RECORD, mlflow_runs, storage, sweep_file

SINGLE_PRESETS = {"keras_cnn": "cnn", "keras_rnn": "rnn", "keras_bilstm": "bilstm"}
AE_PRESETS = ["torch_ae_latent", "torch_ae_dropout", "torch_ae_lr", "torch_ae_optimizer", "torch_ae_output",
              "torch_ae_batch"]


def test_presets_carry_the_published_hyperparameters_and_schedules():
    cnn = compose(["+experiment=keras_cnn"])
    assert (cnn.optimizer._target_, cnn.optimizer.lr, cnn.trainer.batch_size) == ("torch.optim.RMSprop", 0.001, 100)
    assert cnn.trainer.epochs == 15 and compose(["+experiment=keras_cnn", "schedule=full"]).trainer.epochs == 150
    rnn = compose(["+experiment=keras_rnn", "schedule=full"])
    assert (rnn.optimizer._target_, rnn.optimizer.lr, rnn.optimizer.momentum, rnn.trainer.batch_size,
            rnn.trainer.epochs) == ("torch.optim.SGD", 0.01, 0.0, 65, 25)
    lstm = compose(["+experiment=keras_bilstm", "schedule=full"])
    assert (lstm.optimizer._target_, lstm.optimizer.lr, lstm.trainer.batch_size, lstm.trainer.epochs) == (
        "torch.optim.Adam", 0.01, 64, 20)
    ae = compose(["+experiment=torch_ae_latent", "schedule=full"])
    assert (ae.model.latent_dim, ae.model.dropout, ae.optimizer.lr, ae.trainer.batch_size,
            ae.data.train_fraction) == (64, 0.2, 0.001, 100, 1.0)


def test_unknown_schedule_is_one_clear_line(capsys):
    assert main(["+experiment=keras_cnn", "schedule=huge"]) == 2
    assert capsys.readouterr().err.strip() == ("error: schedule='huge' is not one of this experiment's schedules: "
                                               "short, full.")


def test_a_preset_given_as_budget_names_schedule(capsys):
    assert main(["+experiment=keras_cnn", "budget=full"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: budget=full: budget is a time budget (budget.hours=H or budget.minutes=M, with +experiment=best); "
        "a study's epochs preset is schedule=full.")


@pytest.mark.parametrize("preset", sorted(SINGLE_PRESETS))
def test_single_run_presets_train_one_short_epoch(preset, tiny_overrides, workdir, capsys):
    assert main([f"+experiment={preset}", *tiny_overrides]) == 0
    assert "FINISHED" in capsys.readouterr().out
    _, (run,) = mlflow_runs(workdir)
    assert run.data.tags["fmnist.model"] == SINGLE_PRESETS[preset]
    assert f"+experiment={preset}" in run.data.tags["fmnist.command"]
    assert "test/accuracy" in run.data.metrics


@pytest.mark.parametrize("preset", AE_PRESETS)
def test_autoencoder_presets_are_grid_studies_over_one_factor_and_seeds(preset, tiny_overrides, workdir):
    from fmnist_sweep.sweep import load_sweep

    sweep = load_sweep(preset)
    assert sweep.sampler["name"] == "grid" and "seed" in sweep.space.text
    assert sweep.n_trials == len(sweep.space.grid()["seed"]) * max(
        len(v) for k, v in sweep.space.grid().items() if k != "seed")
    assert main([f"+experiment={preset}", *tiny_overrides, "study.n_trials=2"]) == 0
    ts = optuna.load_study(study_name=preset, storage=storage(workdir)).trials
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 2


def test_resnet_search_runs_and_augmentation_keeps_images(tiny_overrides, workdir):
    cfg = compose(["+experiment=resnet_search"])
    assert cfg.model._target_.endswith("ResNet") and cfg.trainer.lr_schedule == "onecycle" and cfg.trainer.eval_flip
    assert cfg.trainer.augment.flip and cfg.trainer.augment.shift > 0
    assert main(["+experiment=resnet_search", *tiny_overrides, "study.n_trials=1", "trainer.epochs=4"]) == 0
    _, runs = mlflow_runs(workdir, "resnet_search")
    (trial,) = [r for r in runs if r.data.tags.get("optuna.trial_number")]
    assert trial.info.status == "FINISHED" and trial.data.tags["fmnist.model"] == "resnet"
    # The one-cycle schedule ends near zero.
    assert trial.data.metrics["lr"] < 0.01 * float(trial.data.params["optimizer.lr"])

    x = torch.rand(64, 1, 28, 28)
    torch.manual_seed(0)
    flipped = augment(x, flip=True)
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))
    assert not torch.equal(flipped, x)
    shifted = augment(x, shift=2)
    assert shifted.shape == x.shape and (shifted == 0).any()
    model = ResNet(widths=[16, 32], blocks=[1, 2])
    logits, loss = model(x, torch.zeros(64, dtype=torch.long))
    assert logits.shape == (64, 10) and loss.item() > 0 and count_params(model) > 0


def _metric(runs, run_id, key):
    (r,) = [r for r in runs if r.info.run_id == run_id]
    return r.data.metrics[key]


def _assert_levels(text: str, workdir, name: str, metric: str) -> None:
    """compare's level table of study ``name``: each level's mean and seeds, and Welch's p against the best."""
    study = optuna.load_study(study_name=name, storage=storage(workdir))
    _, runs = mlflow_runs(workdir, name)
    levels = {}
    for t in study.trials:
        key = next(f"{k}={v}" for k, v in t.params.items() if k != "seed")
        levels.setdefault(key, []).append(_metric(runs, t.user_attrs["mlflow_run_id"], metric))
    assert f"| level | {metric} mean | std | seeds | Welch's t-test p vs best |" in text
    best = (max if metric == "val/accuracy" else min)(levels, key=lambda k: statistics.mean(levels[k]))
    for level, values in levels.items():
        line = next(x for x in text.splitlines() if x.startswith(f"| {level} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{statistics.mean(values):.5f}" and cells[3] == "2"
        if level == best:
            assert cells[4] == "best"
        elif len(set(values)) == 1 and len(set(levels[best])) == 1:  # no spread: no test
            assert cells[4] == "—"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy's, when one level is constant
                p = stats.ttest_ind(levels[best], values, equal_var=False).pvalue
            assert cells[4] == f"{p:.3g}"


def test_compare_two_studies_tables_match_mlflow(tiny_overrides, workdir, tmp_path, capsys):
    cls = sweep_file(tmp_path, """
        objective: val/accuracy
        sampler: {name: grid}
        params:
          optimizer.lr: choice(0.001, 0.01)
          seed: choice(0, 1)
    """, "cls")
    ae = sweep_file(tmp_path, """
        objective: val/loss
        direction: minimize
        sampler: {name: grid}
        params:
          model.latent_dim: choice(4, 8)
          seed: choice(0, 1)
    """, "ae")
    assert main([f"sweep={cls}", "study.name=cls", "model=cnn", "model.widths=[8,16]", "model.dropouts=0.1",
                 *tiny_overrides, "tracking.plots=true"]) == 0
    assert main(["finalize", "cls", "--top-k", "1", "--seeds", "2", *tiny_overrides, "tracking.plots=true"]) == 0
    assert main([f"sweep={ae}", "study.name=ae", "model=autoencoder", *tiny_overrides, *RECORD]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "cmp"
    assert main(["compare", "cls", "ae", "--out", str(out_dir), *tiny_overrides]) == 0
    text = capsys.readouterr().out

    # Model families: the cnn row, test accuracy = the finalised runs' mean ± std.
    header = "| family | best configuration | from | val accuracy | test accuracy | params | train s | images/s |"
    assert header in text
    _, cls_runs = mlflow_runs(workdir, "cls")
    finals = [r for r in cls_runs if r.data.tags.get("fmnist.role") == "final"]
    tests = [r.data.metrics["test/accuracy"] for r in finals]
    row = next(line for line in text.splitlines() if line.startswith("| cnn |"))
    assert f"{statistics.mean(tests):.4f} ± {statistics.stdev(tests):.4f} (n=2)" in row
    assert "finalised" in row and f"{int(finals[0].data.metrics['model/n_params']):,}" in row
    assert "| class | precision | recall | F1 | support |" in text and "Weakest class:" in text

    # Levels over seeds, with Welch's t-test against the best level, numbers from MLflow.
    for name, metric in (("cls", "val/accuracy"), ("ae", "val/loss")):
        _assert_levels(text, workdir, name, metric)
        assert (out_dir / f"factor_{name}.png").stat().st_size > 0
    assert (out_dir / "latent_ae.png").stat().st_size > 0 and "PCA" in text
    assert (out_dir / "compare.md").read_text() in text
    client, (cmp_run,) = mlflow_runs(workdir, "compare")
    assert {"compare.md", "factor_ae.png", "latent_ae.png", "confusion_cnn.png"} <= {
        f.path for f in client.list_artifacts(cmp_run.info.run_id)}
    assert re.search(r"MLflow: experiment 'compare', run [0-9a-f]{32}", text)


def test_compare_errors_are_one_line(tiny_overrides, workdir, capsys):
    assert main(["compare"]) == 2
    assert "usage: python -m fmnist_sweep compare NAME" in capsys.readouterr().err
    assert main(["compare", "nosuch", *tiny_overrides]) == 2
    assert "no study 'nosuch'" in capsys.readouterr().err
    assert main(["compare", "0" * 32, *tiny_overrides]) == 2
    assert f"no MLflow run {'0' * 32}" in capsys.readouterr().err


def test_levels_where_every_seed_failed_are_reported_not_dropped():
    from types import SimpleNamespace

    from fmnist_sweep.compare import Entry, StudyRecord, factor_rows

    def entry(lr, seed, loss):
        run = SimpleNamespace(data=SimpleNamespace(metrics={"val/loss": loss}, tags={}, params={}),
                              info=SimpleNamespace(run_id=f"{lr}-{seed}"))
        return Entry(run, "s", "trial", "autoencoder", "reconstruct", "", seed, {"optimizer.lr": lr, "seed": seed})

    study = StudyRecord("s", ("val/loss", "minimize"),
                        [entry(0.001, 0, 0.010), entry(0.001, 1, 0.012), entry(0.0001, 0, 0.03), entry(0.0001, 1, 0.02)],
                        [{"optimizer.lr": 0.03, "seed": 0}, {"optimizer.lr": 0.03, "seed": 1}])
    rows = {r["level"]: r for r in factor_rows(study)}
    assert rows["optimizer.lr=0.001"]["best"] and rows["optimizer.lr=0.001"]["mean"] == pytest.approx(0.011)
    assert rows["optimizer.lr=0.03"]["mean"] is None and rows["optimizer.lr=0.03"]["failed"] == 2
    assert rows["optimizer.lr=0.0001"]["p"] == pytest.approx(
        stats.ttest_ind([0.010, 0.012], [0.03, 0.02], equal_var=False).pvalue)
    assert [r["level"] for r in factor_rows(study)] == ["optimizer.lr=0.0001", "optimizer.lr=0.001",
                                                         "optimizer.lr=0.03"]
    # levels that do not vary over their seeds: no p-value (Welch's test is undefined), no warning
    study.trials = [entry(0.001, 0, 0.01), entry(0.001, 1, 0.01), entry(0.0001, 0, 0.02), entry(0.0001, 1, 0.02)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = {r["level"]: r for r in factor_rows(study)}
    assert rows["optimizer.lr=0.001"]["best"] and rows["optimizer.lr=0.0001"]["p"] is None
    study.trials[3] = entry(0.0001, 1, 0.03)  # one level varies: tested, still no warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's, on the constant level
        expected = stats.ttest_ind([0.01, 0.01], [0.02, 0.03], equal_var=False).pvalue
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {r["level"]: r for r in factor_rows(study)}["optimizer.lr=0.0001"]["p"] == pytest.approx(expected)
