"""A self-signed certificate for serving the studio over HTTPS (``livediff tls-cert``).

Browsers give the camera only to secure pages: ``https://``, or ``http://localhost``. A creator
whose GPU is another machine opens the studio at ``https://that-machine:8000``; this writes the
certificate and key ``livediff serve --tls-cert --tls-key`` serves it with. It uses
``cryptography``, which aiortc already depends on (DTLS), so no OpenSSL command line is needed.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names a fresh certificate is valid for, besides the machine's host name and those asked for.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class SelfSigned:
    """What was written: the files, the names the certificate is valid for, and two hashes of
    it: its SHA-256 fingerprint (what a browser's certificate viewer shows) and the base64
    SHA-256 of its public key (Chromium's ``--ignore-certificate-errors-spki-list``)."""

    cert: Path
    key: Path
    hosts: tuple[str, ...]
    fingerprint: str
    spki_sha256: str


def default_hosts(extra: list[str] | None = None) -> tuple[str, ...]:
    """``extra``, then localhost and the loopback addresses, then this machine's host name."""
    names = [*(extra or []), *LOCAL_NAMES, socket.gethostname()]
    return tuple(dict.fromkeys(name for name in names if name))


def write_self_signed(
    cert: Path, key: Path, hosts: tuple[str, ...], days: int = 365, *, force: bool = False
) -> SelfSigned:
    """Write a self-signed certificate for ``hosts`` (DNS names or IP addresses) and its
    private key (ECDSA P-256, unencrypted, readable by the owner only) as PEM files.

    Raises FileExistsError for a file that exists, unless ``force``; ValueError for no hosts or
    ``days`` under 1.
    """
    if not hosts:
        raise ValueError("a certificate needs at least one host name or address")
    if days < 1:
        raise ValueError(f"days must be 1 or more, not {days}")
    for path in (cert, key):
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists; pass --force to replace it")
    private_key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(private_key, hosts, days)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key, key_pem)
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    cert.write_bytes(cert_pem)
    return SelfSigned(cert, key, hosts, fingerprint(cert_pem), spki_sha256(cert_pem))


def _certificate(
    private_key: ec.EllipticCurvePrivateKey, hosts: tuple[str, ...], days: int
) -> x509.Certificate:
    public_key = private_key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(private_key, hashes.SHA256())
    )


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    """IP addresses as IPAddress entries (browsers match an address only there), names as DNS."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (from the first byte)."""
    if path.exists():
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)


def fingerprint(cert_pem: bytes) -> str:
    """The certificate's SHA-256 fingerprint, as browsers show it (AB:CD:...)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def spki_sha256(cert_pem: bytes) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo (Chromium's
    ``--ignore-certificate-errors-spki-list`` value, and an HPKP-style pin)."""
    spki = (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")
