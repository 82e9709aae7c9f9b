"""Parsers and verifiers of CVM hardware reports (SEV-SNP, Azure's HCL report, TDX).

Each module reads one published layout strictly and raises the typed errors of
encloud.protocol.errors; encloud.protocol.verifier decides what a report must bind.
"""
