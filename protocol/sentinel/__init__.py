"""Sentinel's wire: its generated stubs (v1/)."""
