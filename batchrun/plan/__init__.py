"""Planning a job (pure Python + numpy, no torch): the global prefix trie, shared prefix groups, the order
rows run in, prefill packs and the KV budget. ``build_plan`` puts them together into a ``Plan``.
"""
