"""encloud's benchmark: one command, encloud beside its peers, ratios from the same run.

Run ``python -m bench --quick`` (under 5 minutes) or ``python -m bench`` (full), with
``--json PATH`` to write the figures and the raw samples they were computed from. See
docs/PERFORMANCE.md for the method, the latest table and the goals.
"""
