"""Sentinel, the key broker (docs/SENTINEL.md): owners register data keys with release
policies; workloads in attested CVMs get them with an owner-signed release order and a fresh
quote. Built on encloud.protocol only (verifier, release orders, audit log, HPKE)."""
