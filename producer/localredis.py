"""A private ``redis-server`` on a free loopback port, for the demo and the tests.

Never touches a Redis it did not start: it picks a free port, its own directory and a password.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """Start, stop and restart a private redis-server (AOF on, no eviction)."""

    def __init__(self, *, password: str | None = None, port: int | None = None,
                 workdir: Path | None = None, user: str | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """``user``: serve only that ACL user (the default user is turned off).
        ``tls``: (CA certificate, server certificate, server key); the port then speaks TLS."""
        self.password = password if password is not None else secrets.token_hex(12)
        self.user = user
        self.tls = tls
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fleet-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.user or ''}:{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return (f"rediss://{auth}127.0.0.1:{self.port}/0"
                f"?ssl_cert_reqs=required&ssl_ca_certs={self.tls[0]}")

    def start(self, timeout: float = 10.0) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make setup installs it)")
        args = [
            binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
            "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
            "--logfile", str(self.workdir / "redis.log"),
        ]
        if self.user and self.password:
            # Everything a fleet needs, nothing that administers the server.
            args += ["--user", "default", "off",
                     "--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all",
                     "-@admin", "-flushall", "-flushdb"]
        elif self.password:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            ca, cert, key = self.tls
            args[args.index("--port") + 1] = "0"
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                     "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.workdir / "redis.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited {self.process.returncode}: {tail}")
            if self._ping():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                s = raw
                if self.tls is not None:
                    s = ssl.create_default_context(cafile=str(self.tls[0])).wrap_socket(
                        raw, server_hostname="127.0.0.1")
                if self.password:
                    user = f"{self.user} " if self.user else ""
                    s.sendall(f"AUTH {user}{self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
