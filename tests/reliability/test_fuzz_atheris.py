"""A short coverage-guided fuzzing run in CI: fuzz/fuzz_chunk.py, fuzz/fuzz_config.py and fuzz/fuzz_url.py
(atheris, libFuzzer) for SECONDS each, side by side. A harness that finds an input raising anything but
the parser's own error (CorruptChunkError / ConfigError), or breaking one of its assertions, exits non-zero
and leaves the input as a crash-* file, which the failure message names.

The long runs are the same scripts with a larger -max_total_time (see fuzz/README.md).
"""

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.reliability.common import REPO

SECONDS = 9  # per harness; the three run at once (one core each at most)
HARNESSES = ("fuzz_chunk", "fuzz_config", "fuzz_url")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed in this Python (pip install atheris: needs a prebuilt wheel for this "
           "Python or clang to build one); the hypothesis tests in test_fuzz_properties.py still run")


def test_atheris_harnesses_short_run(tmp_path):
    procs = {}
    for name in HARNESSES:
        corpus, artifacts = tmp_path / f"{name}-corpus", tmp_path / f"{name}-artifacts"
        corpus.mkdir()
        artifacts.mkdir()
        cmd = [sys.executable, str(REPO / "fuzz" / f"{name}.py"), f"-max_total_time={SECONDS}",
               "-rss_limit_mb=4096", "-timeout=30", f"-artifact_prefix={artifacts}/", str(corpus)]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True), artifacts)
    report, failed = [], []
    for name, (proc, artifacts) in procs.items():
        out, _ = proc.communicate(timeout=SECONDS + 120)
        runs = re.search(r"Done (\d+) runs in (\d+) second", out)
        report.append(f"{name}: {runs.group(1) if runs else '?'} inputs")
        if proc.returncode != 0 or runs is None:
            crashes = sorted(p.name for p in artifacts.iterdir())
            failed.append(f"{name} exited {proc.returncode}, artifacts {crashes}:\n{out[-3000:]}")
    print(f"\n[atheris] {SECONDS} s each: " + "; ".join(report))
    assert not failed, "\n\n".join(failed)
