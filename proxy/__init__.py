"""encloud's local OpenAI-compatible proxy: attests, encrypts, speaks the OpenAI API.

Runs beside the application (loopback by default); built on encloud.client and its retry
rules. `encloud proxy --help`; docs/PROXY.md.
"""
