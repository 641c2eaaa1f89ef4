"""The ``rerank`` command line.

* ``main``: argparse wiring and error handling (``rerank: error: ...``, exit 1 or 2).
* ``run_cmd``: ``rerank run``; ``inputs``: the ``-i`` inputs and files; ``output``: table/JSON.
* ``models_cmd``: ``rerank list`` and ``rerank download``; ``cache``: local hub caches.
* ``serve_cmd``: ``rerank serve`` (``serve run`` as a child process).
* ``registry``: ``rerank_core.registry`` without importing torch.
"""
