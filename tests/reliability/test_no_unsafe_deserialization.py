"""No pickle, eval or exec anywhere in lmcache_core/ or kernels/: stored bytes may come from a shared Redis
written by anyone, and a pickle load or eval on them runs the writer's code.

The scan parses each file (so comments and docstrings that say "never pickle" do not count) and fails on:
imports of pickle-family modules (pickle, cPickle, _pickle, marshal, shelve, dill, cloudpickle, joblib,
jsonpickle); calls of eval, exec, compile, __import__; torch.load (unpickles), numpy.load / np.load
(allow_pickle), yaml.load with a loader that is not a SafeLoader subclass, yaml.unsafe_load, yaml.full_load,
pickle.loads and friends by any name. A second test feeds the scanner known-bad code, so the scan itself
is shown to catch what it looks for.
"""

import ast

import yaml

from tests.reliability.common import REPO

SCANNED = ("lmcache_core", "kernels")
BAD_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "jsonpickle"}
BAD_BUILTINS = {"eval", "exec", "compile", "__import__"}
BAD_ATTRS = {("torch", "load"), ("numpy", "load"), ("np", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
             ("yaml", "unsafe_load_all"), ("yaml", "load_all")}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader"}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def scan(source: str, filename: str, safe_loader_classes: set[str]) -> list[str]:
    """Findings in one file: `file:line: what`."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in BAD_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in BAD_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                      if (node.module, a.name) in {("torch", "load"), ("numpy", "load"), ("builtins", "eval"),
                                                   ("builtins", "exec"), ("yaml", "unsafe_load"),
                                                   ("yaml", "full_load")}]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, attr = name.rpartition(".")
            builtin = name.removeprefix("builtins.") in BAD_BUILTINS
            module_attr = (head.rpartition(".")[2], attr) in BAD_ATTRS
            if builtin or module_attr or head.split(".")[0] in BAD_MODULES:
                found.append(f"{where}: {name}()")
            elif name in ("yaml.load", "load") and head in ("yaml", ""):
                loader = next((k.value for k in node.keywords if k.arg == "Loader"),
                              node.args[1] if len(node.args) > 1 else None)
                loader_name = _dotted(loader).rpartition(".")[2] if loader is not None else ""
                if loader_name not in SAFE_LOADERS | safe_loader_classes:
                    found.append(f"{where}: yaml.load with Loader={loader_name or 'default'}")
    return found


def _safe_loader_subclasses(source: str) -> set[str]:
    """Classes in the file whose base is a SafeLoader (the config module's duplicate-key loader is one)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        bases = {_dotted(b).rpartition(".")[2] for b in getattr(node, "bases", ())}
        if isinstance(node, ast.ClassDef) and bases & SAFE_LOADERS:
            out.add(node.name)
    return out


def test_no_pickle_eval_or_unsafe_loads_in_the_library():
    findings, files = [], 0
    for package in SCANNED:
        for path in sorted((REPO / package).rglob("*.py")):
            source = path.read_text()
            findings += scan(source, str(path.relative_to(REPO)), _safe_loader_subclasses(source))
            files += 1
    assert files > 20, f"scanned only {files} files: wrong root?"
    assert not findings, "unsafe deserialization or code execution:\n" + "\n".join(findings)


def test_the_config_loader_really_is_a_safe_loader():
    from lmcache_core import config

    assert issubclass(config._UniqueKeyLoader, yaml.SafeLoader)


def test_the_scanner_catches_what_it_looks_for():
    bad = '''
import pickle
import marshal as m
from dill import loads
from torch import load
x = eval("1")
exec("x = 1")
y = torch.load(f)
z = np.load(f, allow_pickle=True)
w = yaml.load(text)
v = yaml.load(text, Loader=yaml.Loader)
u = yaml.unsafe_load(text)
t = pickle.loads(b"")
s = __import__("os")
'''
    findings = scan(bad, "bad.py", set())
    for needle in ("import pickle", "import marshal", "from dill", "from torch import load", "eval()", "exec()",
                   "torch.load()", "np.load()", "Loader=default", "Loader=Loader", "yaml.unsafe_load()",
                   "pickle.loads()", "__import__()"):
        assert any(needle in f for f in findings), f"the scanner missed {needle!r}: {findings}"
    good = '''
"""Never pickle: eval() and pickle.loads() in a docstring do not count."""
# pickle.loads(x) in a comment does not count either
data = yaml.load(f, Loader=_UniqueKeyLoader)
pipe.execute()
redis.call("EVAL", script)
'''
    assert scan(good, "good.py", {"_UniqueKeyLoader"}) == []
