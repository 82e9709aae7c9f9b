"""A throwaway PostgreSQL cluster for the tests (Sentinel's production database).

Debian's postgresql-common makes it: pg_createcluster runs initdb as the `postgres` user, and
pg_ctl (via runuser), pg_ctlcluster and pg_dropcluster start, stop and remove it, so this
works when the tests run as root (CI), where initdb itself refuses to run. Each cluster gets
a unique name, a free port on 127.0.0.1 only, a socket folder of its own (never the default
cluster's), a fresh role and database behind a scram password, and is dropped on exit: by
the context manager, by atexit as a backstop, and by a sweep at the next run of clusters
whose creating process died.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_LIB = Path("/usr/lib/postgresql")
CONF_ROOT = Path("/etc/postgresql")
DEFAULT_DATA_ROOT = Path("/var/lib/postgresql")
OWNER = "postgres"
# Underscores, not dashes: pg_ctlcluster warns about dashes (they break systemd unit names).
PREFIX = "encloud_test_"
_NAME = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+$")
# Not tempfile.gettempdir(): a long $TMPDIR could push the socket path past its 107 bytes.
SOCKET_ROOT = Path("/tmp")
READY_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 120.0
CONNECT_HOST = "127.0.0.1"


class PgError(RuntimeError):
    """A cluster could not be made, started, stopped or dropped."""


def _env() -> dict[str, str]:
    # pg_createcluster aborts on an invalid inherited locale; C.UTF-8 always exists on Debian.
    return {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


def _is_root() -> bool:
    return os.geteuid() == 0


def _as_root(argv: list[str]) -> list[str]:
    # pg_createcluster writes /etc/postgresql; without root only passwordless sudo will do.
    return argv if _is_root() else ["sudo", "-n", "--", *argv]


def _as_owner(argv: list[str]) -> list[str]:
    # psql over the unix socket as the superuser (peer auth), to create the test role.
    if _is_root():
        return ["runuser", "-u", OWNER, "--", *argv]
    return ["sudo", "-n", "-u", OWNER, "--", *argv]


def _run(
    argv: list[str], *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # cwd "/": the postgres user may not be allowed into ours. stdin is closed unless given,
    # so nothing can wait on a terminal.
    result = subprocess.run(
        argv,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd="/",
        env=_env(),
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).replace("\n", " | ")
        raise PgError(f"{' '.join(argv)} exited {result.returncode}: {output}")
    return result


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def installed_version() -> str | None:
    """The newest PostgreSQL major version with a server installed, e.g. "15"."""
    versions = [binary.parent.parent.name for binary in PG_LIB.glob("*/bin/postgres")]
    return max(versions, key=_version_key) if versions else None


def pg_available() -> str | None:
    """None when a cluster can be made here, else why not (one line, for pytest.skip).

    ./dev setup installs Debian's postgresql package and CI runs as root, so under
    ./dev test none of these holds and a skip there is a set-up bug."""
    fix = "install Debian's postgresql package (./dev setup does)"
    if shutil.which("pg_createcluster") is None:
        return f"pg_createcluster not found on PATH: {fix}"
    if installed_version() is None:
        return f"no PostgreSQL server under {PG_LIB}/*/bin/postgres: {fix}"
    try:
        pwd.getpwnam(OWNER)
    except KeyError:
        return f"no '{OWNER}' user (Debian's postgresql-common creates it): {fix}"
    if _is_root():
        if shutil.which("runuser") is None:
            return "runuser (util-linux) not found: needed to run psql as the postgres user"
        return None
    if shutil.which("sudo") is None:
        return "not root and no sudo: pg_createcluster must run as root"
    probe = subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return "not root and `sudo -n true` fails: pg_createcluster must run as root"
    return None


def _clusters() -> list[tuple[str, str, int, Path]]:
    """(version, name, port, data directory) of every cluster postgresql-common knows."""
    out = _run(["pg_lsclusters", "--no-header"]).stdout
    rows = []
    for line in out.splitlines():
        # Ver Cluster Port Status Owner Data-directory Log-file
        fields = line.split()
        if len(fields) >= 6 and fields[2].isdigit():
            rows.append((fields[0], fields[1], int(fields[2]), Path(fields[5])))
    return rows


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ephemeral_range() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def _free_port(taken: set[int]) -> int:
    # Outside the ephemeral range, so no outgoing connection takes it between this check
    # and the server's bind; and no port another cluster is configured for (even if down).
    ephemeral = _ephemeral_range()
    for _ in range(500):
        port = 20000 + secrets.randbelow(12000)
        if port in taken or port in ephemeral:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((CONNECT_HOST, port))
            except OSError:
                continue
        return port
    raise PgError(f"no free TCP port found on {CONNECT_HOST}")


def _ctl(version: str, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    # --skip-systemctl-redirect: under systemd, root's pg_ctlcluster would otherwise hand
    # start/stop to postgresql@.service; this way a container and a host behave alike.
    argv = ["pg_ctlcluster", "--skip-systemctl-redirect", *args[:-1], version, name, args[-1]]
    return _run(_as_root(argv), check=False)


def _drop_named(version: str, name: str, extra_dirs: list[Path]) -> None:
    """Stop and remove a cluster (config, data, log, socket folder) and `extra_dirs`."""
    if (CONF_ROOT / version / name).exists():
        # --force: fast shutdown, then immediate, then SIGKILL; 2 means it was not running.
        stopped = _ctl(version, name, "--force", "stop")
        if stopped.returncode not in (0, 2):
            raise PgError(f"pg_ctlcluster stop {version}/{name} failed: {stopped.stderr.strip()}")
        _run(_as_root(["pg_dropcluster", version, name]))
    for folder in extra_dirs:
        if folder.exists():
            # Owned by postgres: when not root, only sudo may remove what the server wrote.
            _run(_as_root(["rm", "-rf", "--", str(folder)]))


def _drop_stale() -> None:
    """Drop test clusters whose creating process is gone (killed before its atexit ran)."""
    for version, name, _, data_dir in _clusters():
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            extra_dirs = [SOCKET_ROOT / name]
            if data_dir.parent.name == name:  # the folder _create made in that run's tmp_dir
                extra_dirs.append(data_dir.parent)
            _drop_named(version, name, extra_dirs)


@dataclass
class PgCluster:
    version: str
    name: str
    port: int
    user: str
    password: str = field(repr=False)
    dbname: str
    socket_dir: Path
    log_file: Path
    data_dir: Path
    # Folders we made around the cluster (pg_dropcluster leaves them): removed by drop().
    extra_dirs: list[Path] = field(default_factory=list, repr=False)
    dropped: bool = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver), over TCP with the password."""
        return (
            f"postgresql+psycopg://{self.user}:{self.password}"
            f"@{CONNECT_HOST}:{self.port}/{self.dbname}"
        )

    def another_database(self, name: str) -> str:
        """Create one more database of the test role (a module's own, beside another
        module's), and return its SQLAlchemy URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"{name!r} is not a plain database name")
        psql = str(PG_LIB / self.version / "bin" / "psql")
        argv = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir)]
        argv += ["-p", str(self.port), "-d", "postgres", "-c"]
        _run(_as_owner([*argv, f"CREATE DATABASE {name} OWNER {self.user}"]))
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    @property
    def dsn(self) -> str:
        """libpq connection string, the same connection as `url`."""
        return (
            f"host={CONNECT_HOST} port={self.port} dbname={self.dbname} "
            f"user={self.user} password={self.password}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        result = _run(_as_root(["tail", "-n", str(lines), str(self.log_file)]), check=False)
        return result.stdout.strip()

    def _pg_isready(self) -> subprocess.CompletedProcess[str]:
        pg_isready = str(PG_LIB / self.version / "bin" / "pg_isready")
        argv = [pg_isready, "-q", "-h", CONNECT_HOST, "-p", str(self.port), "-t", "2"]
        return _run(argv, check=False)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until the server accepts TCP connections on 127.0.0.1 (pg_isready: exit 0)."""
        deadline = time.monotonic() + timeout_s
        while self._pg_isready().returncode != 0:
            if time.monotonic() > deadline:
                raise PgError(
                    f"cluster {self.version}/{self.name} not accepting connections on "
                    f"port {self.port} after {timeout_s:.0f}s; log:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def start(self) -> None:
        """Start the server (again) and return once it accepts connections."""
        if self.dropped:
            raise PgError(f"cluster {self.name} was dropped")
        # pg_ctl as the owner rather than `pg_ctlcluster start`, which adds fixed sleeps
        # (0.5 s polls until three probes in a row succeed: over 2 s a start). pg_ctl -w
        # returns once postmaster.pid says "ready"; the config lives in /etc as
        # pg_createcluster left it (data_directory, hba_file and the socket folder in it).
        pg_ctl = str(PG_LIB / self.version / "bin" / "pg_ctl")
        if _run(_as_owner([pg_ctl, "status", "-D", str(self.data_dir)]), check=False).returncode:
            config = CONF_ROOT / self.version / self.name / "postgresql.conf"
            argv = [pg_ctl, "start", "-w", "-t", f"{READY_TIMEOUT_S:.0f}", "-s"]
            argv += ["-D", str(self.data_dir), "-l", str(self.log_file)]
            argv += ["-o", f'-c config_file="{config}"']
            started = _run(_as_owner(argv), check=False)
            if started.returncode != 0:
                raise PgError(
                    f"pg_ctl start {self.version}/{self.name} failed (exit "
                    f"{started.returncode}): {started.stderr.strip()}; log:\n{self._log_tail()}"
                )
        self.wait_ready()

    def stop(self) -> None:
        """Stop the server: sessions are ended (fast shutdown) and the port is closed, so a
        new connection is refused at once rather than hanging."""
        stopped = _ctl(self.version, self.name, "--force", "stop")
        if stopped.returncode not in (0, 2):  # 2: was not running
            raise PgError(
                f"pg_ctlcluster stop {self.version}/{self.name} failed: {stopped.stderr.strip()}"
            )
        # pg_ctl waits for the postmaster to exit; make sure nothing answers any more.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self._pg_isready().returncode != 2:  # 2: no response
            if time.monotonic() > deadline:
                raise PgError(f"cluster {self.name} still answers on port {self.port}")
            time.sleep(0.05)

    def drop(self) -> None:
        """Stop the server and remove the cluster and its data for good (idempotent)."""
        if self.dropped:
            return
        _drop_named(self.version, self.name, self.extra_dirs)
        self.dropped = True


def _create(version: str, tmp_dir: Path, taken_ports: set[int]) -> PgCluster:
    name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
    owner_group = f"{OWNER}:"  # the owner's login group
    # Socket and log in a short folder of our own: never /var/run/postgresql (the default
    # cluster's), and short enough for a unix socket path.
    base = SOCKET_ROOT / name
    base.mkdir(mode=0o700)  # fails if anything (a planted symlink too) is there already
    extra_dirs = [base]
    _run(_as_root(["chown", owner_group, str(base)]))
    # Data under tmp_dir when the postgres user can reach it; pytest's tmp folders are 0700
    # and root's, so as root it usually cannot: then the default /var/lib/postgresql/V/NAME,
    # which pg_dropcluster removes.
    own = tmp_dir / name
    _run(_as_root(["install", "-d", "-o", OWNER, "-g", OWNER, "-m", "0700", str(own)]))
    extra_dirs.append(own)
    datadir_args: list[str] = []
    data_dir = DEFAULT_DATA_ROOT / version / name
    if _run(_as_owner(["test", "-w", str(own)]), check=False).returncode == 0:
        data_dir = own / "data"
        datadir_args = ["--datadir", str(data_dir)]
    cluster = PgCluster(
        version=version,
        name=name,
        port=_free_port(taken_ports),
        user="encloud",
        password=secrets.token_hex(16),
        dbname="encloud",
        socket_dir=base / "socket",
        log_file=base / "postgresql.log",
        data_dir=data_dir,
        extra_dirs=extra_dirs,
    )
    atexit.register(cluster.drop)
    # Appended to postgresql.conf after pg_createcluster (the last setting wins), not passed
    # as -o: postgresql-common leaves a value that looks like a number unquoted, and
    # `listen_addresses = 127.0.0.1` is a syntax error that stops the server from starting.
    settings = {
        "listen_addresses": CONNECT_HOST,
        "password_encryption": "scram-sha-256",
        # No snakeoil certificate games: loopback only, plain TCP.
        "ssl": "off",
        # A throwaway cluster: durability only costs time.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        # Else pg_ctlcluster would point it into /var/run/postgresql, the default cluster's.
        "external_pid_file": str(base / "postmaster.pid"),
    }
    conf = "\n# encloud tests (tests/postgres.py)\n" + "".join(
        f"{key} = '{value}'\n" for key, value in settings.items()
    )
    argv = [
        "pg_createcluster",
        "--no-status",
        "--port",
        str(cluster.port),
        "--socketdir",
        str(cluster.socket_dir),
        "--logfile",
        str(cluster.log_file),
        # manual: `systemctl start postgresql` or a reboot never starts it.
        "--start-conf",
        "manual",
        "--locale",
        "C.UTF-8",
        *datadir_args,
        version,
        name,
        "--",
        # Explicit auth: pg_createcluster then keeps initdb's pg_hba.conf (peer on the
        # socket, scram on 127.0.0.1/::1) instead of writing md5 for TCP.
        "--auth-local=peer",
        "--auth-host=scram-sha-256",
        "--no-sync",
    ]
    try:
        _run(_as_root(argv))
        conf_file = CONF_ROOT / version / name / "postgresql.conf"
        _run(_as_root(["tee", "-a", str(conf_file)]), input=conf)
    except BaseException:
        cluster.drop()
        atexit.unregister(cluster.drop)
        raise
    return cluster


def _address_in_use(cluster: PgCluster) -> bool:
    return "Address already in use" in cluster._log_tail(50)


def _create_role_and_db(cluster: PgCluster) -> None:
    psql = str(PG_LIB / cluster.version / "bin" / "psql")
    # On stdin, not argv: the password stays out of the process list. Each statement runs
    # on its own (CREATE DATABASE refuses a transaction block).
    script = (
        f"CREATE ROLE {cluster.user} LOGIN PASSWORD '{cluster.password}';\n"
        f"CREATE DATABASE {cluster.dbname} OWNER {cluster.user};\n"
    )
    argv = [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(cluster.socket_dir)]
    argv += ["-p", str(cluster.port), "-d", "postgres", "-f", "-"]
    _run(_as_owner(argv), input=script)


@contextlib.contextmanager
def postgres_cluster(tmp_dir: Path) -> Iterator[PgCluster]:
    """A running cluster with a fresh role and database (`url`, `dsn`), dropped on exit
    whatever happens inside."""
    reason = pg_available()
    if reason is not None:
        raise PgError(reason)
    version = installed_version()
    assert version is not None  # pg_available checked
    _drop_stale()
    cluster: PgCluster | None = None
    try:
        for attempt in range(3):
            cluster = _create(version, tmp_dir, {port for _, _, port, _ in _clusters()})
            try:
                cluster.start()
                break
            except PgError:
                # Another process took the port between our check and the bind: new port.
                if attempt == 2 or not _address_in_use(cluster):
                    raise
                cluster.drop()
                atexit.unregister(cluster.drop)
        assert cluster is not None
        _create_role_and_db(cluster)
        yield cluster
    finally:
        if cluster is not None:
            cluster.drop()
            atexit.unregister(cluster.drop)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """One PostgreSQL cluster for the whole run; tests that stop() it must start() it."""
    reason = pg_available()
    if reason is not None:
        pytest.skip(reason)
    with postgres_cluster(tmp_path_factory.mktemp("postgres")) as cluster:
        yield cluster
