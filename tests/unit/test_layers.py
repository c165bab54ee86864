"""No module imports a higher layer (docs/architecture.md).

Each layer's modules are imported in a fresh interpreter with every higher layer blocked by a meta-path
hook, so an import of a higher layer at import time fails naming both modules. A second check reads every
``import`` statement, the ones inside functions included (a lazy import is still a dependency).

The layers, lowest first; a module belongs to the layer of its longest listed prefix.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from typing import Dict, List, Optional

import pytest

from conftest import ROOT

LAYERS = [
    ("base", ["hpcfl.errors", "hpcfl.atomic", "hpcfl.console", "hpcfl.cquiet", "hpcfl.oom", "hpcfl.checkpoint",
              # packages whose __init__ loads nothing of hpcfl (their names load on first use): "=" is the
              # package alone, not its modules
              "=hpcfl.cluster", "=hpcfl.wsi", "=hpcfl.tasks", "=hpcfl.tasks.dino", "=hpcfl.tasks.segment",
              "=hpcfl.site"]),
    ("config", ["hpcfl.config", "hpcfl.fields", "hpcfl.sitelist",
                # the sections kept beside their owners, registered in the schema
                "hpcfl.wsi.config", "hpcfl.tasks.dino.config", "hpcfl.tasks.segment.config",
                "hpcfl.tasks.mil_config"]),
    ("placement", ["hpcfl.topology", "hpcfl.participation", "hpcfl.device", "hpcfl.comm", "hpcfl.rundir",
                   "hpcfl.cluster.placement", "hpcfl.cluster.slurmcmd", "hpcfl.cluster.nodecheck",
                   "hpcfl.cluster.render"]),
    ("data", ["hpcfl.data", "hpcfl.wsi", "hpcfl.tasks", "hpcfl.features", "hpcfl.model", "hpcfl.stain",
              "hpcfl.metrics", "hpcfl.site.data", "hpcfl.site.layout", "hpcfl.central"]),
    ("federation", ["hpcfl.site", "hpcfl.protocol", "hpcfl.aggregation", "hpcfl.privacy"]),
    ("observe", ["hpcfl.observe", "hpcfl.report",
                 "hpcfl.cluster.slurm"]),  # the SLURM client: a job's state for `hpcfl status`, and sbatch
    ("runtime", ["hpcfl.runtime", "hpcfl.watchdog", "hpcfl.reach"]),
    ("launch", ["=hpcfl", "hpcfl.__main__", "hpcfl.launch", "hpcfl.cli", "hpcfl.pipeline",
                "hpcfl.features.extract"]),
]


def layer_of(module: str) -> int:
    """The index of ``module``'s layer: its longest matching entry ("a.b" matches a.b and a.b.*, "=a.b" a.b
    alone)."""
    best, found = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for e in entries:
            hit = module == e[1:] if e.startswith("=") else (module == e or module.startswith(e + "."))
            if hit and len(e) > best:
                best, found = len(e), i
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return found


def all_modules() -> List[str]:
    out = []
    for p in sorted((ROOT / "hpcfl").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


# Run in a fresh interpreter: the root package is stubbed (its __init__ is the API, the top layer), every
# module of a higher layer is refused, then the layer's modules are imported.
PROBE = r"""
import importlib, importlib.abc, json, sys, types
root, layer, higher, modules = json.loads(sys.argv[1])

def importer():
    f = sys._getframe(2)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if name.startswith("hpcfl") and not f.f_code.co_filename.startswith("<frozen"):
            return name
        f = f.f_back
    return "?"

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in higher:
            raise ImportError(f"{importer()} (layer {layer}) imports {name} (layer {higher[name]})")
        return None

pkg = types.ModuleType("hpcfl")
pkg.__path__ = [root + "/hpcfl"]
sys.modules["hpcfl"] = pkg
sys.meta_path.insert(0, Block())
bad = []
for m in modules:
    try:
        importlib.import_module(m)
    except ImportError as exc:
        bad.append(f"{m}: {exc}")
print(json.dumps(bad))
"""


@pytest.mark.parametrize("index", range(len(LAYERS) - 1), ids=[name for name, _ in LAYERS[:-1]])
def test_a_layer_imports_without_the_layers_above_it(index):
    modules = all_modules()
    mine = [m for m in modules if m != "hpcfl" and layer_of(m) == index]
    higher = {m: LAYERS[layer_of(m)][0] for m in modules if layer_of(m) > index}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(ROOT), LAYERS[index][0], higher, mine])],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def imports_of(module: str) -> Dict[str, int]:
    """Every hpcfl module ``module`` imports (at import time or in a function), with the line."""
    path = ROOT / (module.replace(".", "/") + ".py")
    is_pkg = not path.exists()
    if is_pkg:
        path = ROOT / module.replace(".", "/") / "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out: Dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [stem] if node.module else [f"{stem}.{a.name}" for a in node.names]
            targets += [f"{stem}.{a.name}" for a in node.names if node.module]  # `from pkg import submodule`
        else:
            continue
        for t in targets:
            if t.startswith("hpcfl"):
                out.setdefault(t, node.lineno)
    return out


def _known(name: str, modules: set) -> Optional[str]:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_module_imports_a_higher_layer_even_inside_a_function():
    modules = set(all_modules())
    bad = []
    for m in sorted(modules):
        for target, line in imports_of(m).items():
            t = _known(target, modules)
            if t is None or t == "hpcfl" or m.startswith(t + ".") or t.startswith(m + "."):
                continue  # the root package, a parent package, or a module's own submodule
            if layer_of(t) > layer_of(m):
                bad.append(f"{m}:{line} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_layers_are_documented_in_this_order():
    text = (ROOT / "docs" / "architecture.md").read_text()
    documented = re.findall(r"^\d+\. \*\*(\w+)\*\*", text, flags=re.M)
    assert documented == [name for name, _ in LAYERS]
