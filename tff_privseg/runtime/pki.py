"""A small private PKI for the federation: one CA, worker (server) and coordinator (client) certs.

For tests and first deployments (`tff-privseg worker certs --out DIR`). A hospital network will
usually have its own CA; any X.509 CA works as long as

- worker certificates carry the worker's host names / IPs as subjectAltName and the extended key
  usage serverAuth only, and
- coordinator certificates carry the extended key usage clientAuth only.

The key usages matter: workers accept any certificate signed by the CA as a coordinator, and
OpenSSL checks the clientAuth purpose of the peer's certificate on the server side, so a worker's
own (serverAuth-only) certificate cannot be used to drive another site's worker.

Layout written by `make_pki(DIR)` (keys 0600; `ca.key` belongs offline once certs are issued):
    ca.pem ca.key  server.pem server.key  client.pem client.key
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tff_privseg.errors import UserError

if TYPE_CHECKING:
    from cryptography import x509

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.pem", "client.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its key and the CA that signs the peers we accept."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def server(cls, directory: str | os.PathLike) -> TlsFiles:
        d = Path(directory)
        return cls(d / SERVER_CERT, d / SERVER_KEY, d / CA_CERT)

    @classmethod
    def client(cls, directory: str | os.PathLike) -> TlsFiles:
        d = Path(directory)
        return cls(d / CLIENT_CERT, d / CLIENT_KEY, d / CA_CERT)

    def check(self) -> TlsFiles:
        """Each file exists and holds what it should; the key is private and fits the cert.

        Errors name the file at fault (OpenSSL's own errors name none, so a bad --ca was
        reported against the certificate). A private key that others may read is refused, as
        ssh refuses one: it has to be assumed copied, and the certificate must be re-issued.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not Path(path).is_file():
                raise UserError(f"TLS {what} file not found", path)
        certs = {}
        for what, path in (("certificate", self.cert), ("CA certificate", self.ca)):
            try:
                certs[what] = x509.load_pem_x509_certificates(_read(path))
            except ValueError:
                raise UserError(f"not a PEM {what} (expected BEGIN CERTIFICATE)", path) from None
        mode = Path(self.key).stat().st_mode & 0o777
        if mode & 0o077:
            raise UserError(
                f"private key is accessible by other users (mode {mode:04o}); "
                f"run: chmod 600 {self.key}",
                self.key,
            )
        try:
            key = serialization.load_pem_private_key(_read(self.key), password=None)
        except TypeError:  # a passphrase-protected key: nobody could type it at a worker
            raise UserError(
                "private key is encrypted; give an unencrypted PEM key", self.key
            ) from None
        except ValueError:
            raise UserError(
                "not a PEM private key (expected BEGIN PRIVATE KEY)", self.key
            ) from None
        if key.public_key() != certs["certificate"][0].public_key():
            raise UserError(f"private key does not belong to the certificate {self.cert}", self.key)
        return self


def _read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read the file ({e.strerror or e})", path) from None


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a leaf signs (ECDSA) and agrees keys (ECDH)."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_pki(
    out: str | os.PathLike,
    hosts: Iterable[str] = (),
    days: int = 365,
    force: bool = False,
    ca_name: str = "tff-privseg federation CA",
) -> dict[str, str]:
    """Write a CA, one worker cert (valid for `hosts` + localhost) and one coordinator cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY]
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise UserError(f"would overwrite {', '.join(existing)} (use --force)", out)
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def builder(subject: x509.Name, issuer: x509.Name, key, issuer_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
        )

    ca_key = new_key()
    ca_cert = (
        builder(name(ca_name), name(ca_name), ca_key, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage, sans: list[x509.GeneralName]) -> tuple:
        key = new_key()
        b = (
            builder(name(cn), ca_cert.subject, key, ca_key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    sans: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, *DEFAULT_HOSTS]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_cert, server_key = leaf("tff-privseg worker", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_cert, client_key = leaf("tff-privseg coordinator", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def write(fname: str, data: bytes, private: bool) -> str:
        path = out / fname
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600 if private else 0o644)
        return str(path)

    def pem_key(k) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    pem = serialization.Encoding.PEM
    return {
        "ca": write(CA_CERT, ca_cert.public_bytes(pem), False),
        "ca_key": write(CA_KEY, pem_key(ca_key), True),
        "server_cert": write(SERVER_CERT, server_cert.public_bytes(pem), False),
        "server_key": write(SERVER_KEY, pem_key(server_key), True),
        "client_cert": write(CLIENT_CERT, client_cert.public_bytes(pem), False),
        "client_key": write(CLIENT_KEY, pem_key(client_key), True),
        "hosts": ",".join(dict.fromkeys([*hosts, *DEFAULT_HOSTS])),
    }
