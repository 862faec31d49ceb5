"""experiments/identity_mappings.py (He et al. 2016, Tables 1 and 2) and degradation's
--family=preact: every row is a valid, distinct config; the smoke table end to end, resumed."""

import os
import subprocess
import sys

import pytest

from experiments import degradation, identity_mappings, runs
from resnet_jax import config as config_lib
from resnet_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("table,depth,count", [("shortcuts", 110, 11), ("activations", 110, 5),
                                               ("activations", 164, 5)])
def test_every_row_is_a_valid_distinct_config(table, depth, count):
    planned = identity_mappings.plan(table, "paper", depth, 1, None)
    assert len(planned) == count
    configs = [run.config() for run in planned]
    for config in configs:
        config_lib.validate(config, 1)
        assert config.model.name == ("resnet110" if depth == 110 else "preresnet164")
    assert len({config.model.to_json() for config in configs}) == count
    papers = [dict(run.info)["paper"] for run in planned]
    assert "—" not in papers  # the paper has every one of these cells
    if table == "activations":
        assert papers == (["6.61", "8.17", "7.84", "6.71", "6.37"] if depth == 110 else
                          ["5.93", "6.50", "6.14", "5.91", "5.46"])


def test_rows_are_the_papers_definitions():
    by_key = {dict(r.info)["row"]: r.config().model for r in identity_mappings.plan("shortcuts", "paper", 110, 1, None)}
    assert (by_key["scale_05_05"].shortcut_scale, by_key["scale_05_05"].scale_on) == (0.5, "both")
    assert by_key["scale_0_1"].shortcut_scale == 0.0 and by_key["scale_0_1"].scale_on == "shortcut"
    assert by_key["excl_gate_6"].gate_bias == -6.0 and by_key["short_gate_0"].gate_bias == 0.0
    assert by_key["dropout"].shortcut_dropout == 0.5
    assert by_key["original"].shortcut_variant == "identity" and by_key["original"].activation_order == ""


def test_shortcuts_table_is_resnet110_only():
    with pytest.raises(UserError, match="Table 1, run on ResNet-110 only"):
        identity_mappings.plan("shortcuts", "paper", 164, 1, None)
    with pytest.raises(UserError, match="not a CIFAR depth"):
        identity_mappings.plan("activations", "paper", 111, 1, None)


def test_degradation_preact_family_plans_v2_twins():
    planned = degradation.plan("short", [20, 56], 1, None, family="preact")
    assert [r.variant for r in planned] == ["preplain20,short", "preresnet20,short", "preplain56,short",
                                            "preresnet56,short"]
    assert {r.config().model.name for r in planned} == {"preplain20", "preresnet20", "preplain56", "preresnet56"}
    assert [r.variant for r in degradation.plan("short", [20], 1, None)] == ["plain20,short", "resnet20,short"]


def _accepts(parse, depth) -> bool:
    try:
        return parse(depth) is not None
    except (UserError, ValueError):
        return False


def test_degradation_preact_depths_are_what_configs_build():
    """--family=preact takes exactly the depths configs/cifar.py builds preresnet/preplain
    nets of (basic 6n+2, bottleneck 9n+2 from 164: preresnet164, preresnet1001); the v1
    family exactly those of resnet/plain."""
    from resnet_jax import models

    for preact, name in ((True, "preresnet"), (False, "resnet")):
        ours = {d for d in range(1210) if _accepts(lambda d: runs.parse_depths([str(d)], [], preact=preact), d)}
        built = {d for d in range(1210) if _accepts(lambda d: models.create(f"{name}{d}", family="cifar"), d)}
        assert ours == built
    planned = degradation.plan("smoke", runs.parse_depths(["1001", "164"], [], preact=True), 1, None, family="preact")
    assert [r.variant for r in planned] == ["preplain164,smoke", "preresnet164,smoke", "preplain1001,smoke",
                                            "preresnet1001,smoke"]
    for run in planned:
        config = run.config()
        config_lib.validate(config, 1)
        assert (config.model.shortcut, config.model.bottleneck_stride) == ("B", "v1")  # the bottleneck recipe


@pytest.mark.parametrize("family,depth,expected", [
    ("preact", 1001, "--data: file not found"),  # the depth passed; the next flag is checked
    ("preact", 1000, "--depths: '1000' is not a pre-activation CIFAR depth: 6n+2 (8, 14, 20, ..., 110) or "
                     "a bottleneck depth 9n+2 from 164 (164, 173, ..., 1001)"),
    ("v1", 1001, "--depths: '1001' is not a CIFAR depth 6n+2"),
])
def test_degradation_depths_follow_the_family(tmp_path, family, depth, expected):
    """(test_experiments checks that such a UserError reaches the user as one `error:` line.)"""
    with pytest.raises(UserError) as raised:
        degradation.run_experiment(str(tmp_path / "w"), family=family, depths=[depth], data="npz:/no/such.npz")
    assert str(raised.value).startswith(expected), raised.value
    assert not any(tmp_path.iterdir())


def test_activations_smoke_end_to_end_and_resume(tmp_path):
    workdir = tmp_path / "im"
    command = [sys.executable, "-m", "experiments.identity_mappings", "--table=activations", "--schedule=smoke",
               f"--workdir={workdir}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (workdir / "table.md").read_text()
    for _, case, figure, _, _ in identity_mappings.ACTIVATION_ROWS:
        assert f"| {case} | {figure} | 1 | 8 |" in table
        assert "--config.model.activation_order=" in table
    assert (workdir / "curves.png").stat().st_size > 10_000
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.count("finished earlier") == 5, second.stdout[-2000:]
    bad = subprocess.run(command[:-1] + [f"--workdir={tmp_path / 'x'}", "--depth=164", "--table=shortcuts"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: --table=shortcuts is Table 1" in bad.stderr


@pytest.mark.parametrize("name,overrides", [("preresnet8", {}), ("resnet8", {"stochastic_depth": 0.5}),
                                            ("resnet8", {"shortcut_variant": "shortcut_gating"})])
def test_gradient_flow_probe_takes_the_new_nets(name, overrides):
    import numpy as np

    from experiments import skip_ablation

    images, labels = skip_ablation.probe_batch(None, 4)
    profile = skip_ablation.gradient_profile(name, images, labels, seed=1, **overrides)
    assert len(profile["grad_norms"]) == len(profile["layers"]) > 0
    assert np.all(np.isfinite(profile["grad_norms"]))


def test_error_cell_gives_the_median_the_paper_reports_from_three_seeds():
    assert identity_mappings.error_cell([0.0661]) == "6.61"
    assert identity_mappings.error_cell([0.06, 0.08]) == "7.00 ± 1.41"
    # 5 seeds: mean 7.00, sample std 1.70, median 6.50 (the paper's cells are medians of 5 runs).
    assert identity_mappings.error_cell([0.05, 0.065, 0.06, 0.09, 0.085, None]) == "7.00 ± 1.70 (median 6.50)"
