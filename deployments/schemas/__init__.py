"""HTTP request and response bodies of the rerank and score routes.

* ``POST /rerank``: this project's own shape, or TEI's (a body with ``texts``).
* ``POST /v1/rerank``: the Jina / vLLM shape (documents as strings or ``{text}``, documents
  returned by default).
* ``POST /v2/rerank``: the Cohere v2 shape, as the official ``cohere`` SDK sends it.
* ``POST /score``, ``POST /v1/score``: vLLM's score API ((query, document) pairs, 1:N or N:N).
* ``POST /elasticsearch/rerank``: Elasticsearch's ``hugging_face`` rerank service (both of its
  bodies: ``texts`` as TEI, or ``documents``), answered by a bare array as TEI does.
* ``POST /weaviate/rerank``: Weaviate's ``reranker-transformers`` inference container.
* ``POST /opensearch/rerank``: OpenSearch ml-commons connectors whose post-process function is
  ``default.rerank`` (a bare array of ``{index, relevance_score}``).

Modules: :mod:`.common` (shared fields, errors, the model list), :mod:`.rerank` (this project's,
Jina / vLLM's and Cohere's shapes), :mod:`.dialects` (TEI, Elasticsearch, Weaviate, OpenSearch),
:mod:`.score` (vLLM's score API).

Fields a known client sends that have no effect here are accepted and say so in their
description (docs/clients.md names the client that sends each).

Unknown fields are rejected (422) so that a misspelled option never silently does nothing, and
numbers and booleans are strict (``"2"`` is not an integer, ``"yes"`` not a boolean): a value that
had to be guessed at is an error, not a silent conversion. An error names the field as the client
spelled it (``top_k`` or its alias ``top_n``).
"""

from __future__ import annotations

# Every public name of the submodules, so that callers keep writing `schemas.RerankRequest`.
from .common import *  # noqa: F403
from .dialects import *  # noqa: F403
from .rerank import *  # noqa: F403
from .score import *  # noqa: F403
