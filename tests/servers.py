"""Throwaway services for the scale-out tests: an MLflow tracking server, moto's S3 and
PostgreSQL, each on a free loopback port. Every start waits with a bound; every stop ends the
service's whole process group, also when a test fails."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180.0  # `mlflow server` took 34-51 s to answer on a loaded 2-core box
S3_ENV = {  # moto accepts any credentials; set in the environment, they win over a profile
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """A server process in its own process group at `url`, answering `url + health` once up."""

    def __init__(self, name: str, cmd: list[str], url: str, health: str, log: Path, env: dict):
        self.name, self.cmd, self.url, self.log, self.env = name, cmd, url, log, env
        self.health = url + health
        self.proc: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[Service]:
        """Started for the block and stopped after it, even when the block fails."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited {self.proc.returncode} before answering "
                    f"{self.health}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.health, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"{self.name} did not answer {self.health} in {timeout:.0f} s:\n{self.tail()}"
                )
            time.sleep(0.5)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal the whole group (mlflow server forks uvicorn), then SIGKILL after 30 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # group members left by the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def mlflow_server(backend: str, artifacts: str, log: Path, env: dict | None = None) -> Service:
    """`mlflow server` on a free loopback port with proxied artifacts (not started yet).
    Job execution (a pool of huey consumers, outliving a killed server) is off: nothing here
    uses it."""
    port = free_port()
    cmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", artifacts,
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    return Service("mlflow server", cmd, f"http://127.0.0.1:{port}", "/health", log, env)


@contextlib.contextmanager
def moto_s3(log: Path, bucket: str) -> Iterator[str]:
    """moto's server standing in for S3, with `bucket` created; yields its endpoint URL."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    service = Service("moto_server", cmd, url, "/moto-api/", log, S3_ENV)
    with service.running():
        boto3.client("s3", endpoint_url=url, **_boto_credentials()).create_bucket(Bucket=bucket)
        yield url


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def s3_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Every object key under `prefix` in the moto bucket."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None when it can."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        return "PostgreSQL is not installed (no initdb/pg_ctl on PATH)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root, where initdb refuses to run, and runuser is missing"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, where initdb refuses to run, and there is no user postgres"
    return None


@contextlib.contextmanager
def postgres(database: str = "mlflow") -> Iterator[str]:
    """A scratch PostgreSQL cluster on a free loopback port (trust auth) with `database`;
    yields its SQLAlchemy URI. As root, the cluster runs as the `postgres` user."""
    import psycopg2

    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="genpipe-pg-"))  # not under pytest's 0700 tmp
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    pg_ctl = [*as_user, "pg_ctl", "-D", str(data), "-l", str(folder / "log")]
    try:
        subprocess.run(
            [*as_user, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*pg_ctl, "-o", options, "-w", "-t", "60", "start"],
            check=True,
            capture_output=True,
            timeout=90,
        )
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {database}")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
