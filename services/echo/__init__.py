"""A no-op test application: the ``echo`` processor (``services.echo.processors``) and the
ONNX Identity model it runs (``python -m services.echo.model``). Used by
``pipelines/echo.yaml``, the echo integration test and ``bench/bench_noop_chain.py`` to
measure what the serving system itself costs around a model that does nothing."""
