"""A real Kubernetes API server on loopback, run as controller-runtime's envtest runs one.

etcd and kube-apiserver (built by `testbed.build`) with RBAC authorization on,
a throwaway CA, a serving certificate for 127.0.0.1, service-account signing
keys (so TokenRequest works) and an admin client certificate in group
`system:masters`. There is no kubelet and no controller-manager: whoever
creates a Pod writes its status.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from testbed.build import binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


class _CertificateAuthority:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "testbed-ca")])
        self._name = name
        self.cert = self._sign(name, self._key.public_key(), [
            x509.BasicConstraints(ca=True, path_length=None)])
        self.cert_path = self._write("ca", self.cert, self._key)[0]

    def _sign(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
              extensions: list[x509.ExtensionType]) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2)))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=isinstance(extension, x509.BasicConstraints))
        return builder.sign(self._key, hashes.SHA256())

    def _write(self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def issue(self, stem: str, common_name: str, groups: tuple[str, ...] = (),
              hosts: tuple[str, ...] = ()) -> Credentials:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                             *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups)])
        extensions: list[x509.ExtensionType] = [x509.BasicConstraints(ca=False, path_length=None)]
        if hosts:
            extensions.append(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]))
            extensions.append(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]))
        else:
            extensions.append(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]))
        return Credentials(*self._write(stem, self._sign(subject, key.public_key(), extensions), key))


class KubeAPIServer:
    """`start()` brings up etcd and kube-apiserver; `stop()` ends both and removes their files."""

    def __init__(self, work_dir: Path | None = None) -> None:
        self._own_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="kube-testbed-"))
        self.port = 0
        self.etcd_url = ""
        self._processes: list[subprocess.Popen[bytes]] = []
        self.ca_cert = self.work_dir / "ca.crt"
        self.kubeconfig = self.work_dir / "admin.kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        etcd_bin, apiserver_bin = binary("etcd"), binary("kube-apiserver")
        ca = _CertificateAuthority(self.work_dir)
        serving = ca.issue("apiserver", "kube-apiserver", hosts=("127.0.0.1", "localhost"))
        self.admin = ca.issue("admin", "testbed-admin", groups=("system:masters",))
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.work_dir / "sa.key").write_bytes(sa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (self.work_dir / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

        etcd_port, etcd_peer, self.port = free_port(), free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        logs = self.work_dir / "logs"
        logs.mkdir(exist_ok=True)
        self._spawn([str(etcd_bin), "--data-dir", str(self.work_dir / "etcd"),
                     "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                     "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}"], logs / "etcd.log")
        self._spawn([
            str(apiserver_bin),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.cert_path}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.url}",
            f"--service-account-key-file={self.work_dir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.work_dir / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # No kubelet runs, so no kubernetes Service endpoints to reconcile (127.0.0.1 is refused there).
            "--endpoint-reconciler-type=none",
            # Watches read etcd itself, so compacting etcd (`compact`) makes old versions 410 Gone.
            "--watch-cache=false",
            "--v=0",
        ], logs / "kube-apiserver.log")
        self._write_kubeconfig()
        self._wait_ready(timeout_s)

    def _spawn(self, argv: list[str], log_path: Path) -> None:
        with open(log_path, "ab") as log:
            self._processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, start_new_session=True))

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "testbed",
            "clusters": [{"name": "testbed", "cluster": {"server": self.url,
                                                         "certificate-authority": str(self.ca_cert)}}],
            "users": [{"name": "admin", "user": {"client-certificate": str(self.admin.cert),
                                                 "client-key": str(self.admin.key)}}],
            "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "admin"}}],
        }
        self.kubeconfig.write_text(json.dumps(config, indent=1))

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig that authenticates with a bearer token (a ServiceAccount's, say)."""
        config = json.loads(self.kubeconfig.read_text())
        config["users"] = [{"name": "admin", "user": {"token": token}}]
        path.write_text(json.dumps(config, indent=1))
        return path

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def _wait_ready(self, timeout_s: float) -> None:
        deadline, context, last = time.monotonic() + timeout_s, self.ssl_context(), ""
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!s} exited with {process.returncode}; "
                                       f"see {self.work_dir / 'logs'}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=context, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready after {timeout_s:.0f} s ({last}):\n{self.log_tail()}")

    def compact(self) -> int:
        """Compact etcd's history up to now, as the API server does every few minutes; returns the revision."""
        def post(path: str, body: dict[str, object]) -> dict[str, object]:
            request = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                return dict(json.load(reply))

        header = post("/v3/kv/range", {"key": "Lw=="})["header"]  # any read returns the current revision
        revision = int(header["revision"])  # type: ignore[index]
        post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def log_tail(self, lines: int = 30) -> str:
        path = self.work_dir / "logs" / "kube-apiserver.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, 15)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait()
        self._processes.clear()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
