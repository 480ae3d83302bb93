"""`python -m bench.ttft`: time to first token (TTFT) with and without KV reuse, same prompts, same run.

    python -m bench.ttft                  # servers: long-doc-qa, 2 x 1536 tokens, 3 servers (~3-5 min, 2 cores)
    python -m bench.ttft --quick          # the same on 1 x 512 tokens
    python -m bench.ttft --doc-tokens 7936 --num-docs 1 --questions 3 \\
        --remote-url redis-cluster://127.0.0.1:7000,...                        # the 8k target run, ours-L4 too
    python -m bench.ttft --workload avalanche --remote-url redis-cluster://...  # N identical cold prompts at once
    python -m bench.ttft --workload mixed --remote-url ... --compare '{}' '{"lock_timeout": 5}'   # decode gaps
    python -m bench.ttft --mode inprocess  # vLLM in this process: more scenarios and peers, quick runs
    python -m bench.ttft --workload rag    # segment (position-independent) reuse, in process: speed and quality
    python -m bench.ttft --server http://HOST:PORT --model NAME                 # a server already running

Server mode (the default; bench/ttft/server_mode.py): real vLLM OpenAI servers this run starts and stops
(bench/ttft/servers.py) on loopback ports, as users run them (scheduler and worker in processes of their
own), streamed requests one at a time (bench/ttft/client.py). Rows: recompute, vllm-prefix-cache (on a
server without our connector), vllm-prefix-cache@ours, ours-L2, ours-L3 (after a restart), ours-L4 (a
second server through --remote-url): bench/ttft/serving.py; columns and targets: bench/ttft/server_report.py;
every row's /metrics counters: bench/ttft/metrics.py. Workloads only there: avalanche
(bench/ttft/avalanche.py) and mixed (bench/ttft/mixed.py). The servers' logs are kept; the report names them.

In-process mode (`--mode inprocess`, bench/ttft/inprocess.py): vLLM in this process (harness.py) with each
scenario of bench/ttft/scenarios.py (recompute, vllm-prefix-cache, ours-L1..L4, segment reuse, vLLM's
ExampleConnector and OffloadingConnector, LMCache); rows: bench/ttft/report.py, targets: targets.py.

Both modes: the default model is SmolLM2-135M-Instruct (real weights and tokenizer, bench.models.smollm2_dir;
`--model` takes a local HF checkpoint dir or a name vLLM resolves), float32 (bf16 flips greedy tokens when a
prefill is split), prompts from bench/ttft/workloads.py, and every row's greedy first token checked against
recompute's (a mismatch fails the row). Results as JSON (machine, versions, git SHA) with `--output`, a bar
chart with `--plot`.
"""
