"""Sentinel's database: SQLite (default, embedded) or PostgreSQL, through SQLAlchemy Core.

Every operation is one transaction, so a failure leaves nothing half-written; a database
that does not answer is a DatabaseUnavailableFault (UNAVAILABLE), never a crash. Keys are
stored only wrapped under the KEK (kek.py): this module never sees key material in clear.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from encloud.broker import schema
from encloud.protocol.faults import (
    DatabaseUnavailableFault,
    JobFinishedFault,
    JobHeldFault,
    JobReleaseUnknownFault,
    KekRotatedFault,
    KeyExistsFault,
    KeyRevokedFault,
    OrderUsedFault,
    ResourceExhaustedError,
)

# Used orders are pruned this long after their expiry, not at once: replicas sharing one
# database may disagree on the time by less than this, and none may forget an order another
# would still accept.
PRUNE_MARGIN_SECONDS = 3600
ACTIVE = "active"
REVOKED = "revoked"
JOB_LIVE = "live"
JOB_PAUSED = "paused"
JOB_DONE = "done"
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


@dataclass(frozen=True)
class Owner:
    id: int
    name: str


@dataclass(frozen=True)
class KeyRecord:
    id: int
    key_id: str
    owner: Owner
    policy: bytes
    policy_sha256: str
    state: str
    created_at: int
    versions: tuple[int, ...]


@dataclass(frozen=True)
class Startup:
    """Which machine and which start-up of the workload a quote showed: the AK, the TPM's
    reset and restart counts, and the number of start-ups in its event log. A later start-up
    of one machine compares greater (its log grew, or the TPM was reset since)."""

    ak_fingerprint: str
    reset_count: int
    restart_count: int
    startups: int

    def position(self) -> tuple[int, int, int]:
        return (self.reset_count, self.restart_count, self.startups)


@dataclass(frozen=True)
class JobRow:
    job_id: bytes
    data_key: int
    key_id: str
    state: str
    release_seq: int
    proof_version: int


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite: WAL, foreign keys, and BEGIN IMMEDIATE so concurrent
    writers queue on the lock instead of failing mid-transaction. PostgreSQL: a short
    connect timeout (a database that is down answers UNAVAILABLE in seconds) and pre-ping."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=16,
        max_overflow=16,
        pool_timeout=10,
        connect_args={"connect_timeout": 3},
    )


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", "encloud.broker:migrations")
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic), in one transaction."""
    with _available(), engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "head")


def schema_revision(engine: Engine) -> tuple[str | None, str]:
    """(the database's revision, the newest revision this code knows)."""
    with _available(), engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        head = ScriptDirectory.from_config(_alembic_config(connection)).get_current_head()
    return current, head or ""


@contextlib.contextmanager
def _available() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE:
        raise DatabaseUnavailableFault(
            "the key database is not answering; nothing was written"
        ) from None


class Store:
    """The queries. Each public method is one transaction."""

    def __init__(self, engine: Engine, kek_check: str | None = None) -> None:
        """`kek_check`: the check value of the KEK this process wraps with; every write of
        wrapped material and every read of it first checks the database still has it (shared
        lock), so a Sentinel left running across a KEK rotation refuses instead of writing
        keys under the old KEK or handing out rows it cannot unwrap."""
        self.engine = engine
        self.kek_check = kek_check

    def _same_kek(self, db: Connection) -> None:
        if self.kek_check is None:
            return
        stored = db.execute(
            sa.select(schema.settings.c.value)
            .where(schema.settings.c.name == schema.KEK_CHECK)
            .with_for_update(read=True)
        ).scalar_one_or_none()
        if stored is not None and stored != self.kek_check.encode("ascii"):
            raise KekRotatedFault(
                "the keys were rewrapped under a new KEK: restart Sentinel with it"
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        with _available(), self.engine.begin() as connection:
            yield connection

    # --- Sentinel's own settings --------------------------------------------------------

    def set_settings_once(self, values: dict[str, bytes]) -> dict[str, bytes]:
        """Store values not stored yet; return what is stored (first writer wins)."""
        table = schema.settings
        with self.transaction() as db:
            stored = dict(db.execute(sa.select(table.c.name, table.c.value)).all())
            fresh = {n: v for n, v in values.items() if n not in stored}
            if fresh:
                db.execute(sa.insert(table), [{"name": n, "value": v} for n, v in fresh.items()])
            return {**fresh, **stored}

    # --- owners ---------------------------------------------------------------------------

    def add_owner(self, name: str, cert_spki_sha256: str) -> Owner:
        with self.transaction() as db:
            try:
                row_id = db.execute(
                    sa.insert(schema.owners).values(
                        name=name, cert_spki_sha256=cert_spki_sha256, created_at=_now()
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            except sa.exc.IntegrityError:
                raise ValueError(
                    f"an owner named {name!r} or with this certificate exists already"
                ) from None
        return Owner(int(row_id), name)

    def owner_by_certificate(self, cert_spki_sha256: str) -> Owner | None:
        table = schema.owners
        with self.transaction() as db:
            row = db.execute(
                sa.select(table.c.id, table.c.name).where(
                    table.c.cert_spki_sha256 == cert_spki_sha256
                )
            ).first()
        return Owner(row.id, row.name) if row else None

    def add_signing_key(self, owner: Owner, public_key: bytes, fingerprint: str) -> bool:
        """Register a signing key; False if this owner has it already."""
        with self.transaction() as db:
            try:
                with db.begin_nested():
                    db.execute(
                        sa.insert(schema.signing_keys).values(
                            owner_id=owner.id,
                            public_key=public_key,
                            fingerprint=fingerprint,
                            created_at=_now(),
                        )
                    )
            except sa.exc.IntegrityError:
                return False
        return True

    def signing_keys(self, owner_id: int) -> list[bytes]:
        table = schema.signing_keys
        with self.transaction() as db:
            return list(
                db.execute(
                    sa.select(table.c.public_key).where(table.c.owner_id == owner_id)
                ).scalars()
            )

    # --- data keys ------------------------------------------------------------------------

    def create_key(
        self, owner: Owner, key_id: str, policy: bytes, policy_sha256: str, wrapped: bytes
    ) -> None:
        now = _now()
        with self.transaction() as db:
            self._same_kek(db)
            try:
                with db.begin_nested():
                    row_id = db.execute(
                        sa.insert(schema.keys).values(
                            key_id=key_id,
                            owner_id=owner.id,
                            policy=policy,
                            policy_sha256=policy_sha256,
                            state=ACTIVE,
                            created_at=now,
                        )
                    ).inserted_primary_key[0]  # type: ignore[index]
            except sa.exc.IntegrityError:
                raise KeyExistsFault(f"the key {key_id} exists already") from None
            db.execute(
                sa.insert(schema.key_versions).values(
                    data_key=row_id, version=1, wrapped=wrapped, created_at=now
                )
            )

    def key(self, key_id: str, db: Connection | None = None) -> KeyRecord | None:
        if db is None:
            with self.transaction() as own:
                return self.key(key_id, own)
        k, o = schema.keys, schema.owners
        row = db.execute(
            sa.select(
                k.c.id,
                k.c.key_id,
                k.c.policy,
                k.c.policy_sha256,
                k.c.state,
                k.c.created_at,
                o.c.id.label("owner_id"),
                o.c.name.label("owner_name"),
            )
            .join(o, o.c.id == k.c.owner_id)
            .where(k.c.key_id == key_id)
        ).first()
        if row is None:
            return None
        versions = tuple(
            db.execute(
                sa.select(schema.key_versions.c.version)
                .where(schema.key_versions.c.data_key == row.id)
                .order_by(schema.key_versions.c.version)
            ).scalars()
        )
        return KeyRecord(
            row.id,
            row.key_id,
            Owner(row.owner_id, row.owner_name),
            row.policy,
            row.policy_sha256,
            row.state,
            row.created_at,
            versions,
        )

    def keys_of(self, owner: Owner) -> list[KeyRecord]:
        with self.transaction() as db:
            ids = db.execute(
                sa.select(schema.keys.c.key_id)
                .where(schema.keys.c.owner_id == owner.id)
                .order_by(schema.keys.c.key_id)
            ).scalars()
            found = [self.key(key_id, db) for key_id in list(ids)]
        return [record for record in found if record is not None]

    def next_version(self, record: KeyRecord) -> int:
        return (max(record.versions) if record.versions else 0) + 1

    def add_version(self, record: KeyRecord, version: int, wrapped: bytes) -> None:
        """Add `version`; a concurrent rotation that took the number first wins (KeyExists)."""
        with self.transaction() as db:
            self._same_kek(db)
            _require_active(db, record)
            try:
                with db.begin_nested():
                    db.execute(
                        sa.insert(schema.key_versions).values(
                            data_key=record.id,
                            version=version,
                            wrapped=wrapped,
                            created_at=_now(),
                        )
                    )
            except sa.exc.IntegrityError:
                raise KeyExistsFault(
                    f"version {version} of {record.key_id} was just added by another call"
                ) from None

    def revoke(self, record: KeyRecord) -> None:
        """Mark the key revoked and delete every wrapped version (crypto-shredding)."""
        with self.transaction() as db:
            db.execute(
                sa.delete(schema.key_versions).where(schema.key_versions.c.data_key == record.id)
            )
            db.execute(
                sa.update(schema.keys)
                .where(schema.keys.c.id == record.id)
                .values(state=REVOKED, revoked_at=_now())
            )

    # --- KEK rotation ---------------------------------------------------------------------

    def rewrap_all(
        self, rewrap: Callable[[bytes, bytes, int], bytes], old_check: str, new_check: str
    ) -> int:
        """Replace every wrapped value with `rewrap(wrapped, key id or b"import key", version)`
        and the KEK check value, in one transaction holding the check value's row: a
        concurrent write by a Sentinel on the old KEK waits, then finds the new check value
        and refuses. Returns how many key versions were rewrapped."""
        settings, versions, keys = schema.settings, schema.key_versions, schema.keys
        with self.transaction() as db:
            stored = db.execute(
                sa.select(settings.c.value)
                .where(settings.c.name == schema.KEK_CHECK)
                .with_for_update()
            ).scalar_one_or_none()
            if stored != old_check.encode("ascii"):
                raise ValueError(
                    "the current KEK file is not the one this database is wrapped under"
                )
            rows = db.execute(
                sa.select(
                    versions.c.data_key, versions.c.version, versions.c.wrapped, keys.c.key_id
                ).join(keys, keys.c.id == versions.c.data_key)
            ).all()
            for row in rows:
                db.execute(
                    sa.update(versions)
                    .where(versions.c.data_key == row.data_key, versions.c.version == row.version)
                    .values(wrapped=rewrap(bytes(row.wrapped), row.key_id.encode(), row.version))
                )
            seed = db.execute(
                sa.select(settings.c.value).where(settings.c.name == schema.IMPORT_SEED)
            ).scalar_one()
            db.execute(
                sa.update(settings)
                .where(settings.c.name == schema.IMPORT_SEED)
                .values(value=rewrap(bytes(seed), b"import key", -1))
            )
            db.execute(
                sa.update(settings)
                .where(settings.c.name == schema.KEK_CHECK)
                .values(value=new_check.encode("ascii"))
            )
        return len(rows)

    # --- the workload API -------------------------------------------------------------------

    def add_nonce(
        self, nonce: bytes, expires_at: int, peer: str, max_outstanding: int, max_per_peer: int
    ) -> None:
        """Issue a nonce to `peer`, after dropping expired ones; at most `max_outstanding`
        live at once, and at most `max_per_peer` of them the same caller's, so an
        unauthenticated caller can neither grow the table without bound nor take every slot."""
        table = schema.nonces
        with self.transaction() as db:
            db.execute(sa.delete(table).where(table.c.expires_at <= _now()))
            mine = db.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.peer == peer)
            ).scalar_one()
            if mine >= max_per_peer:
                raise ResourceExhaustedError(
                    "this caller has too many challenges outstanding; use or let some expire"
                )
            live = db.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            if live >= max_outstanding:
                raise ResourceExhaustedError(
                    "too many challenges are outstanding; try again when some expire"
                )
            db.execute(sa.insert(table).values(nonce=nonce, expires_at=expires_at, peer=peer))

    def take_nonce(self, nonce: bytes) -> bool:
        """Consume a nonce: True once for an issued, unexpired nonce, False ever after."""
        with self.transaction() as db:
            result = db.execute(
                sa.delete(schema.nonces).where(
                    schema.nonces.c.nonce == nonce, schema.nonces.c.expires_at > _now()
                )
            )
        return result.rowcount == 1

    def use_order(
        self, order_id: bytes, expires_at: int, record: KeyRecord
    ) -> list[tuple[int, bytes]]:
        """Mark the order used and return the key's wrapped versions, newest first, in one
        transaction: a second use of the order id (even concurrent) is OrderUsedFault. Used
        orders an hour past their expiry are pruned here: Sentinel refuses an expired order
        before it looks at its id, so the table holds only orders that could still pass."""
        table = schema.used_orders
        now = _now()
        with self.transaction() as db:
            self._same_kek(db)
            db.execute(sa.delete(table).where(table.c.expires_at < now - PRUNE_MARGIN_SECONDS))
            try:
                with db.begin_nested():
                    db.execute(
                        sa.insert(table).values(
                            order_id=order_id,
                            data_key=record.id,
                            used_at=now,
                            expires_at=expires_at,
                        )
                    )
            except sa.exc.IntegrityError:
                raise OrderUsedFault("this release order was used already") from None
            return self._versions(db, record)

    # --- jobs ------------------------------------------------------------------------------

    def claim_job(
        self,
        job_id: bytes,
        manifest_sha256: str,
        expires_at: int,
        record: KeyRecord,
        startup: Startup,
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """Start a release of the job for this start-up and return (its release number, the
        key's wrapped versions newest first), in one transaction: the first release; or one
        that follows a paused release on the same machine; or a newer start-up of the same
        machine (the earlier one is gone). JobFinishedFault once the job is done, JobHeldFault
        while another release is live."""
        table = schema.jobs
        now = _now()
        with self.transaction() as db:
            self._same_kek(db)
            row = db.execute(
                sa.select(table).where(table.c.job_id == job_id).with_for_update()
            ).one_or_none()
            versions = self._versions(db, record)
            if not versions:  # an active key always has one; never claim a job without
                raise KeyRevokedFault(f"the key {record.key_id} has no version to release")
            values = {
                "state": JOB_LIVE,
                "ak_fingerprint": startup.ak_fingerprint,
                "reset_count": startup.reset_count,
                "restart_count": startup.restart_count,
                "startups": startup.startups,
                "proof_version": versions[0][0],
                "updated_at": now,
            }
            if row is None:
                seq = 1
                try:
                    with db.begin_nested():
                        db.execute(
                            sa.insert(table).values(
                                job_id=job_id,
                                data_key=record.id,
                                manifest_sha256=manifest_sha256,
                                expires_at=expires_at,
                                release_seq=seq,
                                records_done=0,
                                **values,
                            )
                        )
                except sa.exc.IntegrityError:
                    raise JobHeldFault("a release of this job is live") from None
                return seq, versions
            _check_claim(row, manifest_sha256, startup)
            seq = int(row.release_seq) + 1
            db.execute(
                sa.update(table).where(table.c.job_id == job_id).values(release_seq=seq, **values)
            )
            return seq, versions

    def job(self, job_id: bytes) -> JobRow | None:
        table, k = schema.jobs, schema.keys
        with self.transaction() as db:
            row = db.execute(
                sa.select(table, k.c.key_id)
                .join(k, k.c.id == table.c.data_key)
                .where(table.c.job_id == job_id)
            ).one_or_none()
        if row is None:
            return None
        return JobRow(
            bytes(row.job_id),
            row.data_key,
            row.key_id,
            row.state,
            row.release_seq,
            row.proof_version,
        )

    def wrapped_version(self, data_key: int, version: int) -> bytes | None:
        table = schema.key_versions
        with self.transaction() as db:
            self._same_kek(db)
            wrapped = db.execute(
                sa.select(table.c.wrapped).where(
                    table.c.data_key == data_key, table.c.version == version
                )
            ).scalar_one_or_none()
        return None if wrapped is None else bytes(wrapped)

    def end_release(
        self,
        job_id: bytes,
        release_seq: int,
        outcome: str,
        records_done: int,
        answers_sha256: str | None,
    ) -> None:
        """End the live release `release_seq` of the job as done or paused; a release that
        is not the live one (ended, superseded) is JobReleaseUnknownFault."""
        table = schema.jobs
        with self.transaction() as db:
            result = db.execute(
                sa.update(table)
                .where(
                    table.c.job_id == job_id,
                    table.c.release_seq == release_seq,
                    table.c.state == JOB_LIVE,
                )
                .values(
                    state=outcome,
                    records_done=records_done,
                    answers_sha256=answers_sha256,
                    updated_at=_now(),
                )
            )
        if result.rowcount != 1:
            raise JobReleaseUnknownFault("no live release of this job has that number")

    def _versions(self, db: Connection, record: KeyRecord) -> list[tuple[int, bytes]]:
        """The key's wrapped versions, newest first; KeyRevokedFault once it is revoked."""
        _require_active(db, record)
        rows = db.execute(
            sa.select(schema.key_versions.c.version, schema.key_versions.c.wrapped)
            .where(schema.key_versions.c.data_key == record.id)
            .order_by(schema.key_versions.c.version.desc())
        )
        return [(int(v), bytes(w)) for v, w in rows]


def _require_active(db: Connection, record: KeyRecord) -> None:
    """KeyRevokedFault unless the key is active, read in the caller's transaction."""
    state = db.execute(
        sa.select(schema.keys.c.state).where(schema.keys.c.id == record.id)
    ).scalar_one()
    if state != ACTIVE:
        raise KeyRevokedFault(f"the key {record.key_id} is revoked")


def _check_claim(row: Any, manifest_sha256: str, startup: Startup) -> None:
    """Whether a new release of a job already released may start (see claim_job)."""
    if row.manifest_sha256 != manifest_sha256:
        raise JobHeldFault("another manifest holds this job id")
    if row.state == JOB_DONE:
        raise JobFinishedFault("this job is done: its manifest releases the key no more")
    if row.ak_fingerprint != startup.ak_fingerprint:
        raise JobHeldFault("this job runs on another machine")
    held = (row.reset_count, row.restart_count, row.startups)
    if row.state == JOB_LIVE and startup.position() <= held:
        raise JobHeldFault(
            "a release of this job is live in this start-up of the workload; it may be asked "
            "again after the workload restarts or ends the release"
        )
    if startup.position() < held:
        raise JobHeldFault("this start-up is older than the one the job last ran in")


def _now() -> int:
    return int(time.time())
