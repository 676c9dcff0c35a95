"""antisd stages: one module per pipeline stage, plus the pure math (`objectives`) and shared I/O (`io`)."""

__version__ = "0.1.0"
