"""One module per backend, each a `unclip.runner.Runner`; the registry is `unclip.runner.RUNNERS`."""
