"""In-tree backends. Each folder is a plugin registered under the ``hal.backends`` entry points,
exactly as a third-party vendor package registers its own (see ``backends/reference/plugin.py``
for a complete one, and :mod:`hal.hookspecs` for every hook a backend may implement)."""
