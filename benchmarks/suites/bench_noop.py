"""A pytest plugin that does nothing (``-p bench_noop``): the fixed-cost case's base runs
load it, so pytest's own lookup of a ``-p`` name among the installed entry points (which
imports ``importlib.metadata`` when plugin autoloading is off) is on both sides, and what
is left is procsafe's own import, configuration and end."""
