"""The wheel: built from this tree, installed into a fresh virtual environment, it runs from any
directory, with configs and experiments inside the package (resnet_jax.configs,
resnet_jax.experiments) and no generic top-level names in site-packages."""

import os
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from helpers import ROOT


def _tree_packages() -> set[str]:
    """Every package in the tree, named as installed: resnet_jax..., configs -> resnet_jax.configs."""
    found = set()
    for top, installed in (("resnet_jax", "resnet_jax"), ("configs", "resnet_jax.configs"),
                           ("experiments", "resnet_jax.experiments")):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                relative = os.path.relpath(folder, os.path.join(ROOT, top))
                found.add(installed if relative == "." else f"{installed}.{relative.replace(os.sep, '.')}")
    return found


def test_pyproject_lists_every_package_of_the_tree():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _tree_packages()
    assert setuptools["package-dir"] == {"resnet_jax.configs": "configs", "resnet_jax.experiments": "experiments"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding only the wheel; the test environment's site-packages supply the
    dependencies (a .pth line: its own .pth files, the editable install's among them, are not
    read), so nothing is downloaded."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(base / "dist"), ROOT], check=True, capture_output=True, timeout=300)
    (wheel,) = (base / "dist").glob("resnet_jax-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site_packages, "test_environment.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    cwd = base / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

    def run(*args):
        return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)

    return run, site_packages, cwd


def test_wheel_has_no_generic_top_level_packages(installed):
    run, site_packages, _ = installed
    tops = set(os.listdir(site_packages))
    assert "resnet_jax" in tops and not {"configs", "experiments", "tests", "scripts"} & tops
    where = run("python", "-c", "import resnet_jax.configs.cifar as c, resnet_jax.experiments.runs as r; "
                                "print(c.__file__); print(r.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(site_packages) for line in where.stdout.split())  # the wheel's, not the tree's


def test_installed_commands_run_from_any_directory(installed):
    run, site_packages, cwd = installed
    configs = run("resnet-jax", "configs")
    assert configs.returncode == 0 and "cifar: He et al." in configs.stdout, configs.stderr[-2000:]
    assert f"Files: {os.path.join(site_packages, 'resnet_jax', 'configs')}" in configs.stdout
    usage = run("resnet-jax")
    for experiment in ("degradation", "skip_ablation", "landscape", "lesion", "sanity", "benchmark", "device_suite"):
        assert f"\n  {experiment} " in usage.stdout
    helped = run("resnet-jax", "degradation", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("He et al. 2015, Fig. 6"), helped.stderr[-2000:]
    trained = run("resnet-jax", "train", "--config=digits", f"--workdir={cwd / 'run'}", "--config.train.total_steps=2",
                  "--config.train.batch_size=16", "--config.train.eval_every=2", "--config.train.log_every=1",
                  "--config.train.progress=False", "--config.data.eval_splits=test=test[:32]",
                  "--config.train.eval_batch_size=32")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "done: resnet8 on digits, step 2" in trained.stdout
    unknown = run("resnet-jax", "degredation")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown command 'degredation'; use train,")
