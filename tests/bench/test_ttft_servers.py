"""bench/ttft/servers.py: the process side of the server mode, with real processes on loopback ports (small
Python programs that serve HTTP, or fail to), so start, health, failure reports and stopping are checked in
seconds; the same class starts vLLM in test_ttft_server_mode.py."""

import json
import os
import signal
import sys

import pytest

from bench.ttft.servers import ServerError, ServerProcess, ServerSpec, error_summary, group_alive, start_together

# A server whose GET /health answers 200; with IGNORE_TERM it ignores SIGTERM, and so does a child it starts.
SERVE = """
import http.server, os, signal, subprocess, sys
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _process(tmp_path, name: str, code: str, **kwargs) -> ServerProcess:
    env = {**os.environ, **kwargs.pop("env", {})}
    return ServerProcess(name, lambda port: [sys.executable, "-c", code, str(port)], env,
                         str(tmp_path / f"{name}.log"), **kwargs)


def _group_gone(pgid: int) -> bool:
    """No process of the group runs (a killed one init has not reaped yet is a zombie: it does not run)."""
    return not group_alive(pgid)


def test_start_serves_then_stop_ends_the_process_group(tmp_path):
    server = _process(tmp_path, "ok", SERVE)
    with server:
        pgid = server.proc.pid
        assert server.alive and server.url == f"http://127.0.0.1:{server.port}" and server.start_s > 0
        assert "serving" in server.log_tail()
        assert (tmp_path / "ok.log").read_text().startswith("== ok: ")  # the command heads the log
    assert server.proc is None and _group_gone(pgid)
    server.stop()  # idempotent


def test_a_server_that_exits_reports_its_log_tail(tmp_path):
    server = _process(tmp_path, "dies", "print('no such model: /nowhere'); raise SystemExit(3)")
    with pytest.raises(ServerError, match=r"(?s)exited with status 3 before it was healthy.*no such model") as e:
        server.start()
    assert server.proc is None
    assert error_summary(e.value) == (f"dies exited with status 3 before it was healthy (log {server.log_path}); "
                                      "log ends: no such model: /nowhere")  # a report row's one line


def test_a_server_that_never_answers_is_stopped_at_the_deadline(tmp_path):
    server = _process(tmp_path, "silent", "import time; print('loading', flush=True); time.sleep(600)",
                      start_timeout_s=2.0)
    with pytest.raises(ServerError, match=r"(?s)not healthy within 2 s.*loading"):
        server.start()
    assert server.proc is None  # stopped before the error went on


def test_stop_kills_what_ignores_sigterm_after_the_grace_period(tmp_path):
    server = _process(tmp_path, "stubborn", SERVE, env={"IGNORE_TERM": "1"}, grace_s=1.0).start()
    pgid = server.proc.pid
    server.stop()
    assert _group_gone(pgid)  # the leader and the child it started, both ignoring SIGTERM


def test_start_together_stops_every_server_when_one_fails(tmp_path):
    good = _process(tmp_path, "good", SERVE)
    bad = _process(tmp_path, "bad", "raise SystemExit(1)")
    with pytest.raises(ServerError, match="bad exited"):
        start_together([good, bad])
    assert good.proc is None and bad.proc is None


def test_check_alive_reports_a_server_that_died(tmp_path):
    with _process(tmp_path, "later", SERVE) as server:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        with pytest.raises(ServerError, match="later died with status -9"):
            server.check_alive()


def test_vllm_spec_command_and_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    extra = {"chunk_size": 256, "local_cache_dir": "/tmp/x"}
    spec = ServerSpec(model="/m", max_model_len=2048, kv_cache_gib=3, prefix_caching=True, connector=extra,
                      batched_tokens=1024)
    cmd = spec.command(8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", "/m"), ("--port", "8123"), ("--host", "127.0.0.1"), ("--dtype", "float32"),
                        ("--max-model-len", "2048"), ("--max-num-batched-tokens", "1024")):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert {"--enforce-eager", "--enable-prefix-caching", "--enable-prompt-tokens-details"} <= set(cmd)
    kv = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "LMCacheCoreConnector", "kv_connector_module_path": "connectors.vllm_v1",
                  "kv_role": "kv_both", "kv_connector_extra_config": extra}
    plain = ServerSpec(model="/m", max_model_len=2048, kv_cache_gib=1).command(1)
    assert "--no-enable-prefix-caching" in plain and "--kv-transfer-config" not in plain
    env = spec.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "TRITON_INTERPRET" not in env and "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, sorted(os.sched_getaffinity(0))))
    with pytest.raises(ValueError, match="kv_cache_gib"):
        ServerSpec(model="/m", max_model_len=2048, kv_cache_gib=0)
