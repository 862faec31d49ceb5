"""The import direction of the package: lowest first, nothing imports upward.

Every module of resnet_jax has a place in LAYERS; a module may import only modules of lower
layers (imports inside functions included). experiments/ use resnet_jax, never the
reverse. Imports inside resnet_jax's functions are only of heavy optional dependencies.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first. Modules of one layer do not import each other. `cli` (what every command
# line shares: flags, help, one error line) sits low because evaluate, convert and the
# experiments each have a main() that uses it.
LAYERS = [
    ["errors"],
    ["cli"],
    ["models.blocks"],
    ["models.resnet"],
    ["models", "parallel", "torch_files"],
    ["config"],
    ["optim", "metrics", "checkpoint", "ema"],
    ["rundir"],
    ["steps"],
    ["restore"],
    ["data"],
    ["data.augment", "data.sources", "data.cifar_npz", "data.mix"],
    ["data.device", "data.stream"],
    ["data.pipeline"],
    ["reporting", "figures"],
    ["train", "evaluate", "convert"],
    ["main"],
]
RANK = {f"resnet_jax.{name}": rank for rank, layer in enumerate(LAYERS) for name in layer}
RANK["resnet_jax"] = -1  # the package's empty __init__
# What may be imported inside a function (the import costs seconds or pulls a framework
# only some uses need): package or module -> why.
DEFERRED = {
    "grain": "streaming workers", "resnet_jax.data.stream": "grain",
    "matplotlib": "plots", "resnet_jax.figures": "matplotlib",
    "tensorflow_datasets": "TensorFlow", "tensorboardX": "protobuf", "sklearn": "digits loader",
    "torch": "reference runs",
}


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
    return relative.removesuffix(".__init__")


def _sources(package: str) -> list[str]:
    out = []
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _is_module(name: str) -> bool:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def imports(path: str) -> list[tuple[str, int, bool]]:
    """(module imported, line, inside a function?) of every import statement in `path`;
    `from package import submodule` counts as importing the submodule."""
    tree = ast.parse(open(path).read(), path)
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, id(node) in inside) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                out.append((name if _is_module(name) else base, node.lineno, id(node) in inside))
    return out


def _ours(name: str) -> str | None:
    """The resnet_jax module `name` is (or lies in), else None."""
    while name and name not in RANK:
        if not name.startswith("resnet_jax"):
            return None
        name = name.rpartition(".")[0]
    return name or None


def back_imports() -> list[str]:
    """Every import that goes against LAYERS, as 'file:line: a imports b' lines."""
    problems = []
    for path in _sources("resnet_jax"):
        module = _module_name(path)
        if module not in RANK:
            problems.append(f"{module} has no place in LAYERS (tests/test_layers.py): add it")
            continue
        for name, line, _ in imports(path):
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if name.split(".")[0] == "experiments":
                problems.append(f"{where}: {module} imports {name}; experiments import resnet_jax, never the reverse")
            target = _ours(name)
            if target is not None and target != module and RANK[target] >= RANK[module]:
                problems.append(f"{where}: {module} imports {target} (layer {RANK[target]} >= {RANK[module]})")
    for path in _sources("experiments"):
        for name, line, _ in imports(path):
            target = _ours(name)
            if name.startswith("resnet_jax") and target is None:
                problems.append(f"{os.path.relpath(path, ROOT)}:{line}: imports {name}, which is not a module")
    return problems


def test_nothing_imports_upward():
    assert back_imports() == []


def test_every_layer_names_a_module_that_exists():
    assert [name for name in RANK if not _is_module(name)] == []


def test_imports_inside_functions_are_heavy_optional_dependencies():
    found = []
    for path in _sources("resnet_jax"):
        for name, line, inside in imports(path):
            deferred = any(name == key or name.startswith(key + ".") for key in DEFERRED)
            if inside and not deferred:
                found.append(f"{os.path.relpath(path, ROOT)}:{line}: {name}")
    assert found == []


def test_a_back_import_is_caught(tmp_path, monkeypatch):
    """The check itself: a low module that imported the trainer would be reported."""
    errors = os.path.join(ROOT, "resnet_jax", "errors.py")
    original = imports

    def with_back_import(path):
        found = original(path)
        return found + [("resnet_jax.train", 1, True)] if path == errors else found

    monkeypatch.setitem(globals(), "imports", with_back_import)
    problems = back_imports()
    assert len(problems) == 1 and problems[0].startswith("resnet_jax/errors.py:1: resnet_jax.errors imports "
                                                         "resnet_jax.train")


def test_imports_inside_functions_are_seen():
    """evaluate imports figures (matplotlib) inside `report`: the walk must see it."""
    found = imports(os.path.join(ROOT, "resnet_jax", "evaluate.py"))
    assert ("resnet_jax.figures", True) in {(name, inside) for name, _, inside in found}
