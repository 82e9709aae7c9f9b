"""The `encloud` command: one entry point above the client and the server.

The only package that imports both; the server is imported lazily, inside the
commands that run it, so the client commands work where only the client is
installed. docs/ARCHITECTURE.md.
"""
