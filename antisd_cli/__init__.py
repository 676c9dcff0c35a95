"""The `antisd` command line: thin click shells over `stages`."""
