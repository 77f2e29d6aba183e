"""What every layer shares: async helpers, the worker thread, files, JSON lines, logs,
kinds and params, run directories, secrets, signals, tracebacks (docs/design.md,
"The layers"). Imports nothing of the package but ``errors``."""
