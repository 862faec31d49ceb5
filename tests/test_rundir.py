"""A run's bookkeeping (RunMeta) as checkpoints hold it, and the saved-steps listing."""

import os

from resnet_jax import rundir


def test_run_meta_round_trips_and_ignores_keys_it_does_not_know():
    meta = rundir.RunMeta(step=40, best_error=0.25, best_step=30, evals_since_best=1,
                          normalization={"mean": [1.0], "std": [2.0]}, image_shape=[8, 8, 1])
    saved = meta.to_json()
    assert "imported_from" not in saved  # only imported runs say where they came from
    assert rundir.RunMeta.from_json(saved) == meta
    assert rundir.RunMeta.from_json({**saved, "from_a_newer_version": 1}) == meta
    assert rundir.RunMeta.from_json(None) == rundir.RunMeta()
    imported = rundir.RunMeta(imported_from={"file": "w.th", "format": "akamaster", "sha256": "0"})
    assert rundir.RunMeta.from_json(imported.to_json()) == imported


def test_saved_steps_are_the_numbered_folders_and_nothing_is_created(tmp_path):
    assert rundir.saved_steps(str(tmp_path)) == []
    assert not os.path.exists(tmp_path / "checkpoints")
    for name in ("20", "100", "3.orbax-checkpoint-tmp", "notes"):
        os.makedirs(tmp_path / "checkpoints" / name)
    (tmp_path / "checkpoints" / "7").write_text("a file, not a checkpoint")
    assert rundir.saved_steps(str(tmp_path)) == [20, 100]
