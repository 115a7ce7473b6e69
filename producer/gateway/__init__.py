"""``fleet gateway``: an OpenAI-compatible HTTP server in front of the fleet.

Applications written for vLLM's OpenAI server (the ``openai`` SDK, LangChain's ``ChatOpenAI``,
plain HTTP) point their base URL here instead: ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions`` (streaming included), ``/health`` and ``/metrics``. Stateless; imports
neither vLLM nor torch. See docs/gateway.md.
"""
