"""+experiment=best with a wall-clock budget: plan, search, final models, registration,
the deadline, and a resumed command that goes on where an interrupted one stopped."""

import re
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import Forked, mlflow_runs, run_cli, storage

MINIMUM = re.compile(r"error: budget 0m03s is below the smallest plan on this machine, (\d+)m(\d\d)s: "
                     r"run with budget.minutes=([\d.]+) or more")


def _command(tiny_overrides, minutes: float):
    line = [o for o in tiny_overrides if not o.startswith("trainer.epochs=")]
    # A search share that leaves both the interrupted and the resumed session some search time;
    # two seeds: one wave of final runs on two cores, the smallest plan that still averages seeds.
    return ["+experiment=best", f"budget.minutes={minutes:g}", "budget.search_share=0.2", "budget.seeds=2", *line,
            "trainer.epochs=3"]


def _interrupt_after_first_trial(args, workdir) -> tuple[float, str]:
    """Start the command, Ctrl-C it once the search has finished (or pruned) a trial; (seconds, its output)."""
    t0 = time.time()
    proc = Forked(args, workdir, merge=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(r"\] trial \d+: (COMPLETE|PRUNED)", line):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    return time.time() - t0, "".join(seen) + rest


def _minimum_seconds(tiny_overrides, workdir) -> float:
    """A 3-second budget: one line naming this machine's minimum, exit 2, no study; that minimum."""
    tiny = run_cli(_command(tiny_overrides, 0.05), workdir, timeout=300)
    assert tiny.returncode == 2, tiny.stdout + tiny.stderr
    (line,) = tiny.stderr.splitlines()
    minimum = MINIMUM.fullmatch(line)
    assert minimum, line
    assert not (workdir / "studies.db").exists() or "best" not in optuna.get_all_study_names(storage(workdir))
    minutes, seconds, rounded_up = minimum.groups()
    assert float(rounded_up) * 60 >= int(minutes) * 60 + int(seconds)
    return int(minutes) * 60 + int(seconds)


@pytest.mark.first
def test_budget_below_the_minimum_says_so_then_just_above_it_registers_by_the_deadline_and_resumes(
        tiny_overrides, workdir):
    """A budget below this machine's smallest plan: one line naming the minimum, exit 2, no study.
    1.5 times that minimum, Ctrl-C'd after its first trial and run again: two final seeds, a
    registered model, both sessions within the budget by the clock the study keeps."""
    budget_s = 1.5 * _minimum_seconds(tiny_overrides, workdir)
    args = _command(tiny_overrides, budget_s / 60)
    first_s, first = _interrupt_after_first_trial(args, workdir)
    assert "plan: 2 cores;" in first or "plan: 1 core;" in first
    assert "search: until" in first and " 0 epochs" not in first and "about 0 trials" not in first, first
    done_first = {t.number: (t.state, t.params) for t in optuna.load_study(study_name="best",
                                                                          storage=storage(workdir)).trials
                  if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert done_first

    t0 = time.time()
    second = run_cli(args, workdir)
    second_s = time.time() - t0
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout
    spent_before = out.split("already spent")[0].rsplit(":", 1)[1].strip()
    assert spent_before != "0m00s", out  # the interrupted session's seconds count against the budget
    # (the first session's trials may have taken the whole search share on a busy machine)
    assert re.search(r"^search: (until|no time left for a trial)", out, re.M), out
    for phase in ("plan:", "final: seeds", "- search:", "- final:", "- register:"):
        assert phase in out, out
    study = optuna.load_study(study_name="best", storage=storage(workdir))
    assert study.user_attrs["budget.spent"] <= budget_s, (study.user_attrs["budget.spent"], out)
    # The clock starts with the command: each session's process start (the plan measures a run's)
    # is all the wall time outside it.
    startup = max(float(s) for s in re.findall(r"a run's process starts in ([\d.]+) s", first + out))
    assert first_s + second_s <= budget_s + 2 * startup, (first_s, second_s, startup, out)

    for number, (state, params) in done_first.items():  # the first session's trials are kept, not trained again
        assert study.trials[number].state == state and study.trials[number].params == params
    client, runs = mlflow_runs(workdir, "best")
    for number in done_first:
        assert len([r for r in runs if r.data.tags.get("optuna.trial_number") == str(number)]) == 1

    # Two seeds planned; on a machine slower than it measured, the deadline may cut one, which says so.
    finals = [r for r in runs if r.data.tags.get("fmnist.role") == "final" and r.info.status == "FINISHED"]
    seeds = sorted(r.data.params["seed"] for r in finals)
    assert seeds and set(seeds) <= {"0", "1"}, out
    for cut in {"0", "1"} - set(seeds):
        assert re.search(rf"^final seed {cut}: (?!test accuracy)", out, re.M), out
    assert all("test/accuracy" in r.data.metrics and r.data.params["data.val_fraction"] == "0" for r in finals)
    assert len({r.data.params["trainer.epochs"] for r in finals}) == 1
    assert "test accuracy:" in out and f"over {len(seeds)} seed" in out
    version = client.get_model_version("fmnist-best", "1")
    assert version.tags["optuna.study"] == "best"
    assert "registered: models:/fmnist-best/1" in out
    parent = next(r for r in runs if r.data.tags.get("fmnist.role") == "study")
    assert "budget.plan" in parent.data.tags and "final/accuracy_mean" in parent.data.metrics
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "budget/seconds_left")]
    assert "best_val_vs_time.png" in [f.path for f in client.list_artifacts(parent.info.run_id)]

    third = run_cli(args, workdir, timeout=120)
    assert third.returncode == 0 and "done, nothing left to run" in third.stdout, third.stdout + third.stderr
    assert len(mlflow_runs(workdir, "best")[1]) == len(runs)


def test_a_budget_needs_a_number_and_a_search(tiny_overrides, workdir, capsys):
    from fmnist_sweep.cli import main

    assert main(["+experiment=best", "budget.hours=-1", *tiny_overrides]) == 2
    assert "budget.hours=-1 is not allowed" in capsys.readouterr().err
    assert main(["+experiment=best", "budget.minutes=1", "sweep=null", *tiny_overrides]) == 2
    assert "a time budget needs a search" in capsys.readouterr().err


def test_a_budget_buys_the_widest_model_whose_final_models_train_long_enough(tiny_overrides, workdir, monkeypatch,
                                                                            capsys):
    """The plan's first choice, model.widths: the widest whose plan trains the final models for
    best.FINAL_EPOCHS epochs, else the one that trains them longest (here a machine where a
    width's speed goes as 1 / width², stood in at our own measurement seam); below the
    narrowest one's smallest plan, one line naming that minimum; widths the command sets are kept."""

    from fmnist_sweep import best
    from fmnist_sweep.best_plan import Plan
    from fmnist_sweep.config import compose
    from fmnist_sweep.errors import UserError

    def measured(cfg, cores, seconds, like=None):
        ips = 60.0 * (32 / cfg.model.widths[0]) ** 2
        return {"threads": {k: {"train": ips * k, "eval": 3 * ips * k} for k in (1, 2)}, "slowdown": 1.0,
                "at_once": len(cores), "startup": 4.0, "n_train": 18_000, "n_val": 12_000, "n_all": 60_000,
                "n_test": 10_000, "seconds": 1.0}

    monkeypatch.setattr(best, "_measure", measured)
    line, cores = ["+experiment=best", "budget.minutes=60", *tiny_overrides], [0, 1]
    widths = best._widths(compose(line), line)
    assert widths == ["", "model.widths=[16,32,64]", "model.widths=[8,16,32]"]
    cfgs = [compose(line + [w]) if w else compose(line) for w in widths]
    minimum = [best.minimum_budget(c, measured(c, cores, 1), cores, 0.0) for c in cfgs]
    assert minimum[0] > minimum[1] > minimum[2]

    def epochs(total):
        return [Plan(total, total, cores, measured(c, cores, 1), c, {}).final_epochs for c in cfgs]

    for total, want in ((minimum[0] * 1.01, 1), (minimum[0] * 20, 0), ((minimum[1] + minimum[2]) / 2, 2)):
        e, fits = epochs(total), [total >= m for m in minimum]
        long_enough = [i for i in range(3) if fits[i] and e[i] >= best.FINAL_EPOCHS]
        assert want == (long_enough[0] if long_enough else max((i for i in range(3) if fits[i]), key=e.__getitem__))
        assert best._fit(cfgs[0], line, cores, total, time.time())[0] == widths[want], (total, e)
    out = capsys.readouterr().out
    assert "model.widths=[16,32,64]: the final models train " in out and "fewer at the configured one" in out
    with pytest.raises(UserError, match=r"below the smallest plan on this machine, (\d+)m(\d\d)s"):
        best._fit(cfgs[0], line, cores, minimum[2] * 0.9, time.time())
    mine = [*line, "model.widths=[64,128,256]"]
    assert best._widths(compose(mine), mine) == [""]
