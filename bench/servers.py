"""Start what the calls hit: the mailsvc server, the SMTP sink and the Mailgun stand-in."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailsvc.v1 import settings_pb2, settings_pb2_grpc

from bench import workload
from bench.procs import Child, ChildError, Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Helper:
    """The sink or the stand-in: a talking child and where it listens."""

    child: Child
    port: int


def start_sink(procs: Processes, samples: Path) -> Helper:
    argv = [sys.executable, "-m", "bench.sink", "--samples", str(samples)]
    child = procs.start("sink", argv, talk=True)
    return Helper(child, int(child.expect("READY", 30)))


def start_standin(procs: Processes) -> Helper:
    child = procs.start(
        "mailgun-standin", [sys.executable, "-m", "bench.mailgun_standin"], talk=True
    )
    return Helper(child, int(child.expect("READY", 30)))


@dataclass(frozen=True)
class Mailsvc:
    """A running `python -m mailsvc serve`."""

    child: Child
    address: str

    def put_settings(self, settings: settings_pb2.MailSettings) -> None:
        """Replace all settings, as superadmin."""
        metadata = (("authorization", f"Bearer {workload.token(['superadmin'], 'root')}"),)
        request = settings_pb2.UpdateMailSettingsRequest(settings=settings)
        with grpc.insecure_channel(self.address) as channel:
            stub = settings_pb2_grpc.SettingsServiceStub(channel)
            stub.UpdateMailSettings(request, metadata=metadata, timeout=10)


def start_mailsvc(procs: Processes, name: str, data_dir: Path, *flags: str) -> Mailsvc:
    """Start the server as a user would and wait until health says SERVING."""
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSVC_")}
    env["MAILSVC_JWT_SECRET"] = workload.JWT_SECRET
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "mailsvc", "serve", "--listen", address]
    argv += ["--data-dir", str(data_dir), "--shutdown-grace", "2", *flags]
    child = procs.start(name, argv, env=env)
    _wait_serving(child, address)
    return Mailsvc(child, address)


def _wait_serving(child: Child, address: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise ChildError(f"{child.name} exited ({child.proc.returncode}){child.tail()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise ChildError(f"{child.name} did not become SERVING within {timeout:.0f} s{child.tail()}")
