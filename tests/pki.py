"""The test PKI: the dev PKI the batch demo uses too (encloud.cli.dev_pki)."""

from encloud.cli.dev_pki import Issued, issue_certificate

__all__ = ["Issued", "issue_certificate"]
