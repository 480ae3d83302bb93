"""`python -m bench.ttft`'s server mode (the default): the rows and targets on hand-made results, the
avalanche and mixed workloads' figures, the command line's modes, and one end-to-end run on real vLLM
servers (SmolLM2-135M float32, 512-token documents) with a real 3-master Redis Cluster: every row, ours-L4
included (a second server serves what the first wrote to Redis, with recompute's first tokens).

Time: the end-to-end run starts 4 servers (~30-90 s each on 2 shared cores); its bounds are the harness's
own deadlines (--start-timeout-s per server, --timeout-s per request), and the run is sent SIGTERM (it then
stops every server it started) if it outlives them all.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.models import smollm2_dir
from bench.ttft.avalanche import summarize_burst, target_notes as avalanche_notes
from bench.ttft.cli import parse_config
from bench.ttft.mixed import compare_notes, gaps
from bench.ttft.results import Result
from bench.ttft.server_report import server_rows, server_target_notes
from bench.ttft.servers import group_alive
from bench.ttft.serving import SERVER_SCENARIOS
from tests.lmcache_core.conftest import redis_binaries, redis_cluster  # noqa: F401  (the real Redis fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S, REQUEST_TIMEOUT_S = 300, 120


def test_cli_modes_and_their_defaults():
    cfg = parse_config([])
    assert (cfg.mode, cfg.workload, cfg.num_docs, cfg.doc_tokens, cfg.questions) == ("servers", "long-doc-qa", 2,
                                                                                      1536, 2)
    assert parse_config(["--mode", "inprocess"]).doc_tokens == 3072  # the in-process sizes are unchanged
    assert parse_config(["--workload", "rag"]).mode == "inprocess"  # rag's only mode
    assert parse_config(["--quick"]).doc_tokens == 512 and parse_config(["--quick", "--doc-tokens", "256"]).doc_tokens == 256
    mixed = parse_config(["--workload", "mixed", "--compare", '{"async_load": false}', '{"async_load": true}'])
    assert mixed.compare == ((("async_load", False),), (("async_load", True),)) and mixed.doc_tokens == 2048
    assert parse_config(["--workload", "avalanche"]).avalanche_requests == 8
    for argv in (["--workload", "rag", "--mode", "servers"], ["--workload", "avalanche", "--mode", "inprocess"],
                 ["--scenarios", "ours-L9"], ["--workload", "mixed", "--compare", "[1]"]):
        with pytest.raises(SystemExit):
            parse_config(argv)


def _result(name, ttft, first=5, cached=0, **metrics) -> Result:
    return Result(name, labels=["a", "b"], ttft_s=[ttft, ttft], first_tokens=[first, first], prompt_tokens=[520, 520],
                  cached_tokens=[cached, cached], metrics=metrics, server_log=f"/logs/{name}.log")


def test_server_rows_ratios_metrics_and_the_first_token_check():
    results = [_result("recompute", 2.0, computed_tok=1040), _result("vllm-prefix-cache", 0.2, cached=512),
               _result("vllm-prefix-cache@ours", 0.25, cached=512),
               _result("ours-L2", 0.2, cached=512, loaded_tok=0, external_tok=1024),
               _result("ours-L3", 0.4, first=6, cached=512, loaded_tok=1024, external_tok=1024),
               Result("ours-L4", "skipped", "no url")]
    rows = {r["scenario"]: r for r in server_rows(results, kv_bytes_per_token=1000)}
    assert rows["ours-L2"]["x_vllm_pc"] == pytest.approx(0.8) and rows["recompute"]["pct_of_base"] == 100
    assert rows["ours-L2"]["external_tok"] == 512 and rows["ours-L2"]["loaded_MB"] == pytest.approx(1.024)
    assert "which counted 0 loaded" in rows["ours-L2"]["note"] and "counted" not in rows["ours-L3"]["note"]
    assert rows["recompute"]["computed_tok"] == 520 and rows["ours-L2"]["server_log"] == "/logs/ours-L2.log"
    assert rows["ours-L3"]["status"] == "failed" and "first token differs" in rows["ours-L3"]["reason"]
    assert rows["ours-L4"]["status"] == "skipped"
    notes = server_target_notes(list(rows.values()), doc_tokens=7936)
    assert notes == ["target ours-L2 p50 <= 1x vllm-prefix-cache@ours's: 0.2 s vs 0.25 s = 0.80x met"]  # L3 failed
    small = server_target_notes(list(rows.values()), doc_tokens=512)
    assert "not evaluated" in small[0] and small[1].endswith("(not evaluated)")


def test_avalanche_figures_and_targets():
    reqs = [{"server": i % 2, "ttft_s": t, "first_token": 9, "prompt_tokens": 2000, "cached_tokens": c}
            for i, (t, c) in enumerate([(3.0, 0), (3.4, 1792), (3.5, 1792), (3.2, 1792)])]
    on = summarize_burst({"setting": "single-flight on", "status": "ok"}, reqs, [2000.0, 300.0], 2000)
    assert on["computed_tok"] == 2300 and on["x_prompt"] == pytest.approx(1.15)
    assert on["first_ttft_s"] == 3.0 and on["waiter_ttft_max_s"] == 3.5 and on["waiter_ttft_p50_s"] == 3.4
    off = summarize_burst({"setting": "single-flight off", "status": "ok"},
                          [{**r, "cached_tokens": 0} for r in reqs], [4000.0, 4000.0], 2000)
    notes = avalanche_notes([on, off], 2000)
    assert notes[0].endswith("1.15x met (off: 4.00x)") and notes[1].endswith(" met")
    split = summarize_burst({"setting": "x", "status": "ok"}, [{**reqs[0], "first_token": 8}, *reqs[1:]], [1.0, 1.0], 2000)
    assert split["status"] == "failed" and "2 different first tokens" in split["reason"]


def test_mixed_gaps_during_and_before_the_loads_and_the_comparison():
    during, before = gaps([0.0, 0.1, 0.2, 1.5, 1.6, 3.0], start=1.0, end=2.0)
    assert before == pytest.approx([0.1, 0.1]) and during == pytest.approx([1.3, 0.1, 1.4])
    rows = [{"tier": "L3", "setting": "{}", "itl_max_ms": 400.0, "new_ttft_p50_s": 0.5},
            {"tier": "L4", "setting": "{}", "status": "failed"},
            {"tier": "L3", "setting": '{"async_load": true}', "itl_max_ms": 150.0, "new_ttft_p50_s": 0.55},
            {"tier": "L4", "setting": '{"async_load": true}', "itl_max_ms": 90.0, "new_ttft_p50_s": 0.4}]
    assert compare_notes(rows) == ['mixed L3: {"async_load": true} vs {}: longest decode gap 150 vs 400 ms (0.38x; '
                                   'target <= 0.5x), new-request TTFT p50 0.55 vs 0.5 s (1.10x; target <= 1.2x)']


def _run(cmd: list[str], env: dict, limit_s: float) -> subprocess.CompletedProcess:
    """The benchmark as a user runs it; past `limit_s`, SIGTERM (it stops its servers), then SIGKILL."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench.ttft ran past {limit_s:.0f} s; stderr tail:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_server_mode_every_row_on_real_servers_with_redis_cluster(redis_cluster, tmp_path):  # noqa: F811
    url = "redis-cluster://" + ",".join(f"{n.host}:{n.port}" for n in redis_cluster.masters())
    out, logs = tmp_path / "ttft.json", tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "TRITON_INTERPRET", "VLLM_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.ttft", "--model", smollm2_dir(), "--num-docs", "1", "--doc-tokens", "512",
           "--questions", "2", "--remote-url", url, "--output", str(out), "--log-dir", str(logs),
           "--plot", str(tmp_path / "ttft.png"), "--start-timeout-s", str(START_TIMEOUT_S),
           "--timeout-s", str(REQUEST_TIMEOUT_S)]
    proc = _run(cmd, env, limit_s=4 * START_TIMEOUT_S + 30 * REQUEST_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in report["rows"]}
    assert list(rows) == list(SERVER_SCENARIOS)
    for name, row in rows.items():
        assert row["status"] == "ok" and row["requests"] == 2, (name, row["reason"], row["server_log"])
        assert row["first_token_mismatches"] == [] and all(isinstance(t, int) for t in row["first_tokens"]), row
    assert rows["recompute"]["hit_rate"] == 0 and rows["recompute"]["computed_tok"] >= 512
    assert rows["vllm-prefix-cache"]["vllm_hit_tok"] >= 512 and rows["vllm-prefix-cache@ours"]["vllm_hit_tok"] >= 512
    for name in ("ours-L2", "ours-L3", "ours-L4"):  # our connector served the document, vLLM's cache did not
        m = rows[name]["metrics"]
        assert m["vllm_hit_tok"] == 0 and m["external_tok"] >= 2 * 512 and rows[name]["hit_rate"] > 0.9, (name, m)
    assert rows["ours-L3"]["loaded_tok"] >= 512 and rows["ours-L4"]["loaded_tok"] >= 512
    assert report["config"]["model_name"] == "SmolLM2-135M-Instruct" and (tmp_path / "ttft.png").stat().st_size
    servers = report["config"]["servers"]
    assert [s["name"] for s in servers] == ["plain", "ours", "ours-restarted", "ours-redis"]
    for s in servers:
        assert os.path.getsize(s["log"]) > 0 and not group_alive(s["pgid"]), s
    assert "ours-L4" in proc.stdout and any("server logs" in n for n in report["notes"])


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                continue
    return out


def test_sigterm_stops_the_server_being_started(tmp_path):
    """SIGTERM (or Ctrl-C) while a server starts: the run stops it (its whole process group) and exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "TRITON_INTERPRET", "VLLM_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.ttft", "--model", smollm2_dir(), "--quick", "--log-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "plain.log").exists() or not _children(proc.pid):  # the API server runs
            assert proc.poll() is None and time.monotonic() < deadline, "no server was launched"
            time.sleep(0.2)
        servers = _children(proc.pid)
        time.sleep(2)  # well into its start
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    assert not any(group_alive(pid) for pid in servers)
