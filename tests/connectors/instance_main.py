"""One vLLM instance with the connector, in its own process: run a prompt set, wait for the cache's
background writes, write the outputs as JSON. Used by test_vllm_redis_cluster.py:

    python -m tests.connectors.instance_main MODEL SET_NAME EXTRA_CONFIG_JSON OUT_JSON
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(model: str, set_name: str, extra_json: str, out_path: str) -> None:
    from tests.connectors import prompts
    from tests.connectors.vllm_helpers import connector_totals, make_llm, run, shutdown

    llm = make_llm(model, json.loads(extra_json))
    try:
        outputs = run(llm, prompts.TINY_SETS[set_name])
        totals = connector_totals(llm)
    finally:
        shutdown(llm)  # the connector's shutdown waits for the background writes to Redis
    with open(out_path, "w") as f:
        json.dump({"outputs": [[list(o.token_ids), list(o.logprobs), o.num_cached_tokens] for o in outputs],
                   "totals": totals}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
