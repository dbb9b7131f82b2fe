"""A throwaway certificate authority, and a TLS listener on the local RabbitMQ.

The listener is started inside the running node (`rabbitmqctl eval`), on a port
of its own, and stopped at the end: the broker's configuration is not touched.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from torchrelay.broker import TLS_ENV

__all__ = ["Certificates", "TLSListener", "make_certificates", "pika_parameters"]


@dataclass(frozen=True)
class Certificates:
    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: verifying against it must fail."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
                 names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, certificate: x509.Certificate,
           key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Path, Path | None]:
    cert_path = folder / f"{stem}.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = None
    if key is not None:
        key_path = folder / f"{stem}.key"
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return cert_path, key_path


def make_certificates() -> Certificates:
    """A CA, a server certificate for localhost and a client certificate, in a folder the
    broker's own user can read (the keys are throwaway)."""
    folder = Path(tempfile.mkdtemp(prefix="torchrelay-tls-"))
    folder.chmod(0o755)
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _certificate("torchrelay test CA", ca_key, "torchrelay test CA", ca_key, ca=True)
    other = _certificate("someone else's CA", other_key, "someone else's CA", other_key, ca=True)
    server = _certificate("localhost", server_key, "torchrelay test CA", ca_key, ca=False,
                          names=[x509.DNSName("localhost"),
                                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _certificate("a torchrelay client", client_key, "torchrelay test CA", ca_key,
                          ca=False)
    ca_path, _ = _write(folder, "ca", ca)
    other_path, _ = _write(folder, "other-ca", other)
    server_path, server_key_path = _write(folder, "server", server, server_key)
    client_path, client_key_path = _write(folder, "client", client, client_key)
    for path in folder.iterdir():
        path.chmod(0o644)
    assert server_key_path is not None and client_key_path is not None
    return Certificates(folder, ca_path, server_path, server_key_path, client_path,
                        client_key_path, other_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TLSListener:
    """An `amqps` listener of the local RabbitMQ node, with `certificates`: it verifies a
    client certificate when one is presented, and requires none."""

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        self.port = _free_port()

    @staticmethod
    def available() -> bool:
        return shutil.which("rabbitmqctl") is not None

    def _eval(self, expression: str) -> str:
        rabbitmqctl = shutil.which("rabbitmqctl") or "rabbitmqctl"
        result = subprocess.run([rabbitmqctl, "eval", expression], capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0 or "error" in result.stdout:
            raise RuntimeError(f"rabbitmqctl eval failed: {result.stdout}{result.stderr}")
        return result.stdout

    def start(self) -> None:
        c = self.certificates
        self._eval(
            f"rabbit_networking:start_ssl_listener({self.port}, ["
            f'{{cacertfile, "{c.ca}"}}, {{certfile, "{c.server_cert}"}}, '
            f'{{keyfile, "{c.server_key}"}}, {{verify, verify_peer}}, '
            "{fail_if_no_peer_cert, false}], 1, 1).")

    def stop(self) -> None:
        """Stop the listener (gone already if the node restarted) and forget the CA."""
        with contextlib.suppress(RuntimeError):
            self._eval(f"rabbit_networking:stop_tcp_listener({self.port}).")
        shutil.rmtree(self.certificates.folder, ignore_errors=True)

    def url(self, plain_url: str) -> str:
        """`plain_url` (an `amqp://` URL) through this listener."""
        rest = plain_url.split("://", 1)[1]
        netloc, _, path = rest.partition("/")
        credentials, _, _ = netloc.rpartition("@")
        return f"amqps://{credentials}@localhost:{self.port}/{path}"


def pika_parameters(url: str) -> Any:
    """pika's parameters for `url`; for `amqps://`, verifying against the fleet's CA (as
    torchrelay does, from `$TORCHRELAY_TLS_CA_FILE`)."""
    import pika  # noqa: PLC0415 - only tests that talk raw AMQP need it

    parameters = pika.URLParameters(url)
    if parameters.ssl_options is not None:
        context = ssl.create_default_context(cafile=os.environ.get(TLS_ENV[0]))
        parameters.ssl_options = pika.SSLOptions(context, parameters.host)
    return parameters
