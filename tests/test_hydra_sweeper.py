"""Sweep configs users already have: hydra-optuna-sweeper's own shape and
lightning-hydra-template's hparams_search files as `sweep=FILE`, and Hydra's `-m`."""

import optuna
from optuna.trial import TrialState

from fmnist_sweep.cli import main
from tests.helpers import sweep_file, trials

# lightning-hydra-template's configs/hparams_search/mnist_optuna.yaml, as it stands.
LIGHTNING_HYDRA_TEMPLATE = """
# @package _global_
defaults:
  - override /hydra/sweeper: optuna
optimized_metric: "val/acc_best"
hydra:
  mode: "MULTIRUN"
  sweeper:
    _target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper
    storage: null
    study_name: null
    n_jobs: 1
    direction: maximize
    n_trials: 2
    sampler:
      _target_: optuna.samplers.TPESampler
      seed: 1234
      n_startup_trials: 10
    params:
      model.optimizer.lr: interval(0.0001, 0.1)
      data.batch_size: choice(32, 64)
      model.net.lin1_size: choice(64, 128, 256)
"""

# The plugin's own example shape: the sampler chosen by its config group, seeded.
PLUGIN = """
defaults:
  - override hydra/sweeper: optuna
  - override hydra/sweeper/sampler: random
hydra:
  sweeper:
    sampler:
      seed: 123
    direction: maximize
    study_name: sphere
    storage: null
    n_trials: 2
    n_jobs: 4
    params:
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
      model.activation: choice(tanh, relu)
"""


def test_a_lightning_hydra_template_file_runs_as_it_stands(tiny_overrides, workdir, tmp_path, capsys):
    path = sweep_file(tmp_path, LIGHTNING_HYDRA_TEMPLATE, "mnist_optuna")
    assert main([f"sweep={path}", *tiny_overrides]) == 0
    err = capsys.readouterr().err
    assert "optimized_metric val/acc_best -> val/accuracy" in err
    assert "params: model.optimizer.lr -> optimizer.lr" in err and "params: data.batch_size -> trainer.batch_size" in err
    assert "params: model.net.lin1_size is not a key of this config, left out" in err
    assert "Traceback" not in err
    ts = trials(workdir, "mnist_optuna")
    assert len([t for t in ts if t.state == TrialState.COMPLETE]) == 2
    assert all(set(t.params) == {"optimizer.lr", "trainer.batch_size"} for t in ts)
    study = optuna.load_study(study_name="mnist_optuna", storage=f"sqlite:///{workdir / 'studies.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_the_plugins_example_maps_its_sampler_and_names_what_it_cannot_honour(tiny_overrides, workdir, tmp_path,
                                                                             capsys):
    from fmnist_sweep.sweep import load_sweep

    sweep = load_sweep(str(sweep_file(tmp_path, PLUGIN, "sphere")))
    assert sweep.sampler == {"name": "random", "seed": 123} and sweep.n_trials == 2
    assert sweep.objectives == [("val/accuracy", "maximize")]
    err = capsys.readouterr().err
    assert "n_jobs: 4 -> run `workers -n 4`" in err and "study_name: use study.name=sphere" in err
    bad = sweep_file(tmp_path, PLUGIN.replace("direction: maximize", "direction: maximize\n    x: 1").replace(
        "defaults:", "optimized_metric: val/f1_score\ndefaults:"), "bad")
    assert main([f"sweep={bad}", *tiny_overrides]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "optimized_metric 'val/f1_score' is not recorded here; the closest:" in line


def test_hydra_multirun_is_a_grid_study_that_resumes(tiny_overrides, workdir, capsys):
    line = ["-m", "optimizer.lr=1e-3,1e-2", "model.activation=tanh,relu", *tiny_overrides]
    assert main(line) == 0
    out = capsys.readouterr().out
    (name,) = [n for n in optuna.study.get_all_study_names(f"sqlite:///{workdir / 'studies.db'}")]
    assert name.startswith("multirun-") and name in out
    ts = trials(workdir, name)
    assert sorted((t.params["optimizer.lr"], t.params["model.activation"]) for t in ts) == [
        (0.001, "relu"), (0.001, "tanh"), (0.01, "relu"), (0.01, "tanh")]
    assert main(line) == 0  # the same command: the same study, nothing left to run
    assert len(trials(workdir, name)) == 4
    assert main(["-m", "optimizer.lr=interval(1e-4, 1e-2)", "hydra.sweeper.n_trials=2", *tiny_overrides]) == 0
    tpe = [n for n in optuna.study.get_all_study_names(f"sqlite:///{workdir / 'studies.db'}") if n != name]
    assert len(tpe) == 1 and len(trials(workdir, tpe[0])) == 2
    assert main(["-m", *tiny_overrides]) == 2
    assert "-m sweeps over values" in capsys.readouterr().err
