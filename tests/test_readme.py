"""The README's configuration table cannot drift from conf/."""

import re
from pathlib import Path

from fmnist_sweep.config import compose, group_options, resource_dir

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_config_table_lists_every_group_and_option():
    rows = dict(re.findall(r"^\| `(\w+)` \| ([\w, ]+) \| \w+ \|$", README, re.M))
    groups = sorted(p.name for p in resource_dir("conf").iterdir() if p.is_dir())
    assert sorted(rows) == groups
    for group, options in rows.items():
        assert options.split(", ") == group_options(group), group


def test_defaults_in_the_table_are_the_composed_defaults():
    cfg = compose([])
    defaults = dict(re.findall(r"^\| `(\w+)` \| [\w, ]+ \| (\w+) \|$", README, re.M))
    assert cfg.model._target_.split(".")[-2] == defaults["model"]
    assert cfg.optimizer._target_.split(".")[-1].lower() == defaults["optimizer"]


def test_experiment_table_lists_every_experiment():
    listed = re.findall(r"^\| `(\w+)` \| [^|]+ \| [^|]+ \|$", README, re.M)
    assert sorted(set(listed) & set(group_options("experiment"))) == group_options("experiment")
