"""A Prefect server for the length of a pipeline run (`make repro`, `genpipe audit`).

Without `PREFECT_API_URL`, every `python -m flows.<stage>` process starts its own temporary
server (~8-13 s each on 2 cores). Starting one server for the whole `dvc repro` and pointing
every stage at it cuts that to ~2-4 s per stage; a long-running `prefect server start` with
`PREFECT_API_URL` exported removes even the start-up.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def local_server(timeout: float = 90.0) -> Iterator[str]:
    """Yield an API URL: the configured one if set, else a server started here and stopped after."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")) / "genpipe-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with log.open("ab") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=out, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(api_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not start; see {log}")
            time.sleep(0.3)
        os.environ["PREFECT_API_URL"] = api_url
        yield api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
