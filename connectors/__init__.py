"""Engine protocols spoken on top of lmcache_core: `connectors.vllm_v1.LMCacheCoreConnector` for vLLM v1.

Nothing is imported here: `import connectors` must not pull in vLLM.
"""
