"""Apps the tests run: workers import them by module path (``--app``, ``WORKERKIT_APP``)."""
