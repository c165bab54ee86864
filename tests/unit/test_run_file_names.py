"""Every file name of a run directory is spelled in one place, hpcfl/rundir/paths.py (RunPaths): code
elsewhere reaches a run's files through it, so a renamed file cannot leave a reader behind."""
import ast
import re

from conftest import ROOT

NAMES = ("config.yaml", "launch-config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "cross_site.json",
         "best.npz", "report.html", "stop-requested", "run.lock", "mlflow.json", "jobs.json", "attention")
SPELLED = re.compile(r"(^|/)(%s)$|rank-|\.beat$|\.error\.json$|round-" % "|".join(map(re.escape, NAMES)))

# (file, string) pairs that may spell a name: each says why.
ALLOWED = {
    ("hpcfl/checkpoint.py", "^round-(\\d{6,})\\.npz$"),  # the checkpoint format names its files;
    ("hpcfl/checkpoint.py", ".round-*.npz.tmp-*"),  # RunPaths.checkpoint() asks it
    ("hpcfl/checkpoint.py", "round-"),
    ("hpcfl/observe/heatmaps.py", "attention"),  # an array's name inside an attention .npz, not a file
    ("hpcfl/watchdog.py", "/rank-NNNN.log)\n"),  # a message
    # Not yet ported (their owners' branches edit these files this session; the lead moves them to RunPaths):
    ("hpcfl/tasks/mil_net.py", "attention"),  # RunPaths.attention (also the array's name)
}


def spelled_names():
    found = set()
    for path in sorted((ROOT / "hpcfl").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "hpcfl/rundir/paths.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
                    and len(n.value) < 40 and SPELLED.search(n.value)):
                found.add((rel, n.value))
    return found


def test_run_file_names_are_spelled_only_in_rundir_paths():
    assert spelled_names() - ALLOWED == set()


def test_the_allow_list_holds_only_names_still_spelled():
    assert ALLOWED <= spelled_names(), "remove the entries that RunPaths now serves from ALLOWED"
