"""HTTPS: ``livediff tls-cert`` writes a self-signed pair, ``livediff serve --tls-cert --tls-key``
serves the API (and WHIP/WHEP and the page) over TLS on its one port, and a bad certificate or
key is a clear error at start (exit status 2), not a traceback."""

from __future__ import annotations

import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from livediff.cli import build_parser, main, settings_from_args
from livediff.config import Settings
from livediff.server.tls import LOCAL_NAMES, SelfSigned, spki_sha256, write_self_signed
from tests.server.test_health_cli import _free_port


@pytest.fixture
def pair(tmp_path: Path) -> SelfSigned:
    return write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", LOCAL_NAMES, days=2)


def wait_for_health(url: str, process: subprocess.Popen[bytes], verify: ssl.SSLContext) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            status = str(httpx.get(f"{url}/health", verify=verify).json()["status"])
            if status != "LOADING":
                return status
        except httpx.TransportError:
            pass
        assert process.poll() is None, "livediff serve exited"
        assert time.monotonic() < deadline, "livediff serve did not answer over https"
        time.sleep(0.1)


def test_serve_answers_https_and_refuses_http(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        [sys.executable, "-m", "livediff", "tls-cert", "--cert", str(cert), "--key", str(key)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert spki_sha256(cert.read_bytes()) in made.stdout
    port = _free_port()
    command = [sys.executable, "-m", "livediff", "serve", "--port", str(port)]
    command += ["--tls-cert", str(cert), "--tls-key", str(key), "--log-level", "warning"]
    process = subprocess.Popen(command)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        assert wait_for_health(f"https://127.0.0.1:{port}", process, trusting) == "IDLE"
        page = httpx.get(f"https://localhost:{port}/", verify=trusting)
        assert page.status_code == 200 and "<html" in page.text
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{port}/health")  # not trusted: the system's CAs
    finally:
        process.terminate()
        assert process.wait(20) in (0, -signal.SIGTERM)


def test_the_certificate_names_the_hosts_and_the_key_is_private(pair: SelfSigned) -> None:
    certificate = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert pair.key.stat().st_mode & 0o777 == 0o600
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)  # a matching pair
    assert len(pair.fingerprint.split(":")) == 32


def test_tls_cert_does_not_overwrite(pair: SelfSigned, capsys: pytest.CaptureFixture[str]) -> None:
    before = pair.cert.read_bytes()
    assert main(["tls-cert", "--cert", str(pair.cert), "--key", str(pair.key)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert pair.cert.read_bytes() == before
    forced = ["tls-cert", "--cert", str(pair.cert), "--key", str(pair.key), "--force"]
    assert main([*forced, "--host", "studio.lan", "--host", "10.1.2.3"]) == 0
    out = capsys.readouterr().out
    assert "studio.lan, 10.1.2.3, localhost" in out and pair.cert.read_bytes() != before


def test_tls_settings_come_from_the_environment(
    pair: SelfSigned, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVEDIFF_TLS_CERT", str(pair.cert))
    monkeypatch.setenv("LIVEDIFF_TLS_KEY", str(pair.key))
    settings = settings_from_args(build_parser().parse_args(["serve"]))
    assert (settings.tls_cert, settings.tls_key) == (str(pair.cert), str(pair.key))
    assert Settings().tls_cert == str(pair.cert)


def bad_pairs(pair: SelfSigned, other: SelfSigned, garbage: Path) -> dict[str, list[str]]:
    """Arguments of `livediff serve` that must not start, and what the error must say."""
    cert, key = str(pair.cert), str(pair.key)
    return {
        "invalid tls_cert: Value error, no file at '/no/such.pem'": [
            "--tls-cert",
            "/no/such.pem",
            "--tls-key",
            key,
        ],
        "tls_cert and tls_key go together": ["--tls-cert", cert],
        "(KEY_VALUES_MISMATCH)": ["--tls-cert", cert, "--tls-key", str(other.key)],
        "(a file that is not PEM, or an encrypted key)": [
            "--tls-cert",
            str(garbage),
            "--tls-key",
            key,
        ],
    }


def test_bad_tls_files_are_clear_errors_at_start(
    pair: SelfSigned, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write_self_signed(tmp_path / "o.pem", tmp_path / "o-key.pem", LOCAL_NAMES, days=1)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for expected, arguments in bad_pairs(pair, other, garbage).items():
        assert main(["serve", *arguments]) == 2, arguments
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


def test_an_encrypted_key_is_refused_without_a_prompt(
    pair: SelfSigned, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    os.chmod(encrypted, 0o600)
    assert main(["serve", "--tls-cert", str(pair.cert), "--tls-key", str(encrypted)]) == 2
    assert "an encrypted key" in capsys.readouterr().err
