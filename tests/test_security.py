"""Admin APIs need the admin key (gRPC and HTTP), the key never reaches a log, and gRPC speaks TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydantic
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from server.admin import GRPC_RESTRICTED_PREFIX, AdminClient, AdminKeyError
from server.client import AsyncScoringClient, ScoringClient
from server.errors import ScoringError
from server.installation import find_triton
from server.launcher import TritonServer
from server.settings import ADMIN_KEY_ENV, DEFAULT_ADMIN_HEADER, REDACTED, TritonSettings
from training.features import FRAUD_FEATURES

from triton_fixtures import serving

MODEL = "fraud"
HEADER = DEFAULT_ADMIN_HEADER


# --- settings -> flags (no server) ---------------------------------------------------------------

def test_restriction_flags_use_tritonservers_colon_syntax():
    key = secrets.token_hex(16)
    args = TritonSettings(admin_key=key, admin_apis=("model-repository", "logging")).to_args()
    expected = f"model-repository,logging:{HEADER}={key}"
    assert f"--http-restricted-api={expected}" in args and f"--grpc-restricted-protocol={expected}" in args


def test_key_is_masked_in_redacted_args_repr_and_validation_errors(monkeypatch):
    key = secrets.token_hex(16)
    monkeypatch.setenv(ADMIN_KEY_ENV, key)
    settings = TritonSettings()
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == key
    shown = " ".join(settings.to_args(redact=True)) + repr(settings) + str(settings)
    assert key not in shown and f"{HEADER}={REDACTED}" in shown
    bad_key = "short secret"
    with pytest.raises(pydantic.ValidationError, match="openssl rand") as info:
        TritonSettings(admin_key=bad_key)
    assert bad_key not in str(info.value)


def test_without_a_key_nothing_is_restricted():
    assert not any("restricted" in a for a in TritonSettings().to_args())


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"grpc_use_ssl": True}, "grpc_server_cert and grpc_server_key"),
        ({"grpc_use_ssl_mutual": True, "grpc_server_cert": "c.pem", "grpc_server_key": "k.pem"}, "grpc_root_cert"),
        ({"admin_apis": ("health",)}, "admin_apis"),
        ({"admin_header": "Admin Key"}, "admin_header"),
    ],
)
def test_invalid_security_settings_say_what_to_set(fields, problem):
    with pytest.raises(pydantic.ValidationError, match=problem):
        TritonSettings(**fields)


def test_tls_flags():
    args = TritonSettings(grpc_use_ssl_mutual=True, grpc_server_cert=Path("/tls/s.crt"),
                          grpc_server_key=Path("/tls/s.key"), grpc_root_cert=Path("/tls/ca.crt")).to_args()
    assert {"--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true", "--grpc-server-cert=/tls/s.crt",
            "--grpc-server-key=/tls/s.key", "--grpc-root-cert=/tls/ca.crt"} <= set(args)


# --- real Triton ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def admin_key() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def restricted(trained, admin_key, tmp_path_factory) -> Iterator[TritonServer]:
    """Triton with the default admin APIs restricted to `admin_key`."""
    with serving(trained.ws, tmp_path_factory.mktemp("restricted") / "triton.log", admin_key=admin_key) as server:
        yield server


def _x(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, len(FRAUD_FEATURES.names))).astype(np.float32)


@pytest.mark.triton
@pytest.mark.parametrize("sent", [None, "wrong-key-0123456789"], ids=["no-key", "wrong-key"])
def test_grpc_admin_calls_without_the_key_are_rejected(restricted, sent):
    expected = "StatusCode.UNAUTHENTICATED" if sent is None else "StatusCode.PERMISSION_DENIED"
    with AdminClient(restricted.settings.grpc_url, sent) as admin:
        for call in (admin.repository_index, lambda: admin.load_model(MODEL), lambda: admin.unload_model(MODEL)):
            with pytest.raises(AdminKeyError, match=f"admin key rejected.*set {ADMIN_KEY_ENV}") as info:
                call()
            assert info.value.status == expected, "a refused key is not transient: never UNAVAILABLE"
    client = grpcclient.InferenceServerClient(restricted.settings.grpc_url)
    headers = {GRPC_RESTRICTED_PREFIX + HEADER: sent} if sent else None
    for call in (client.get_log_settings, client.get_inference_statistics, client.get_trace_settings,
                 client.get_system_shared_memory_status):
        with pytest.raises(InferenceServerException, match="restricted"):
            call(headers=headers)
    assert client.is_model_ready(MODEL), "a rejected unload must not unload anything"


@pytest.mark.triton
@pytest.mark.parametrize("sent", [None, "wrong-key-0123456789"], ids=["no-key", "wrong-key"])
def test_http_admin_calls_without_the_key_are_rejected(restricted, sent):
    client = httpclient.InferenceServerClient(restricted.settings.http_url)
    headers = {HEADER: sent} if sent else None
    calls = (client.get_model_repository_index, lambda headers: client.unload_model(MODEL, headers=headers),
             client.get_log_settings, client.get_inference_statistics, client.get_trace_settings)
    for call in calls:
        with pytest.raises(InferenceServerException, match=f"restricted, expecting header '{HEADER}'") as info:
            call(headers=headers)
        assert info.value.status() == "403"
    assert client.is_model_ready(MODEL)


@pytest.mark.triton
def test_admin_calls_with_the_key_succeed(restricted, admin_key):
    with AdminClient.from_settings(restricted.settings) as admin:
        assert [(m.name, m.state) for m in admin.repository_index()] == [(MODEL, "READY")]
        admin.load_model(MODEL)
        assert admin.model_ready(MODEL) and not admin.model_ready(MODEL, 999)
    http = httpclient.InferenceServerClient(restricted.settings.http_url)
    assert http.get_model_repository_index(headers={HEADER: admin_key})[0]["state"] == "READY"
    assert "model_stats" in http.get_inference_statistics(headers={HEADER: admin_key})


@pytest.mark.triton
def test_inference_health_and_metadata_stay_open(restricted):
    with ScoringClient(restricted.settings.grpc_url, retries=0) as client:
        assert client.score(_x()).probabilities.shape == (4, 2)
    http = httpclient.InferenceServerClient(restricted.settings.http_url)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
    assert http.get_model_metadata(MODEL)["name"] == MODEL
    assert http.get_model_config(MODEL)["max_batch_size"] > 0


@pytest.mark.triton
def test_admin_key_is_not_on_tritonservers_command_line(restricted, admin_key):
    """`ps` shows any user every command line; the key travels in the owner-only environment (admin_key_shim.c)."""
    assert restricted.installation.admin_key_shim is not None, "this machine has gcc: the shim must be built"
    proc = Path(f"/proc/{restricted.pid}")
    cmdline = (proc / "cmdline").read_bytes().decode()
    assert "--grpc-restricted-protocol=" in cmdline and admin_key not in cmdline
    assert f"{ADMIN_KEY_ENV}={admin_key}".encode() in (proc / "environ").read_bytes().split(b"\0")
    assert (proc / "environ").stat().st_mode & 0o077 == 0, "the environment must be readable by its owner only"


def test_without_a_compiler_the_key_falls_back_to_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    installation = find_triton(None, tmp_path)
    assert installation.admin_key_shim is None
    key = secrets.token_hex(16)
    server = TritonServer(TritonSettings(admin_key=key), installation, tmp_path / "triton.log")
    assert any(key in arg for arg in server.command) and "LD_PRELOAD" not in server.environment()
    monkeypatch.delenv("CC")
    shimmed = TritonServer(TritonSettings(admin_key=key), find_triton(None, tmp_path), tmp_path / "triton.log")
    assert not any(key in arg for arg in shimmed.command) and shimmed.environment()[ADMIN_KEY_ENV] == key


@pytest.mark.triton
def test_admin_key_reaches_no_log(trained, tmp_path, caplog):
    key = secrets.token_urlsafe(32)
    log_path = tmp_path / "triton.log"
    caplog.set_level(logging.DEBUG)
    with serving(trained.ws, log_path, admin_key=key, log_verbose=1) as server:
        with AdminClient.from_settings(server.settings) as admin:
            admin.load_model(MODEL)
        with AdminClient(server.settings.grpc_url, key[::-1]) as wrong, pytest.raises(AdminKeyError) as info:
            wrong.repository_index()
    assert f"{HEADER}={REDACTED}" in caplog.text, "the launcher should log the masked command line"
    for where, text in (("our log", caplog.text), ("the Triton log", log_path.read_text()),
                        ("the error", str(info.value)), ("the settings repr", repr(server.settings))):
        assert key not in text and key[::-1] not in text, f"the admin key leaked into {where}"


# --- TLS -----------------------------------------------------------------------------------------

def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _issue(
    subject: str,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA (ca.pem), a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "treeops test CA")])
    ca = _issue("treeops test CA", ca_name, ca_key, ca_key.public_key(),
                [(x509.BasicConstraints(ca=True, path_length=None), True)])
    _write(folder, "ca", ca, ca_key)
    sans = {"server": [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
            "client": [x509.DNSName("treeops-client")]}
    usages = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.SubjectAlternativeName(sans[stem]), False), (x509.ExtendedKeyUsage([usages[stem]]), False)]
        cert = _issue(stem, ca.subject, ca_key, key.public_key(), extensions)
        _write(folder, stem, cert, key)
    return folder


@pytest.fixture(scope="module")
def expected_scores(trained):
    import mlflow

    mlflow.set_tracking_uri(trained.ws.tracking_uri)
    booster = mlflow.xgboost.load_model("models:/fraud@champion")
    return booster.inplace_predict(_x(32))


@pytest.mark.triton
def test_scoring_over_tls_and_plaintext_is_refused(trained, tmp_path, pki, expected_scores, admin_key):
    tls = {"grpc_use_ssl": True, "grpc_server_cert": pki / "server.pem", "grpc_server_key": pki / "server.key"}
    with serving(trained.ws, tmp_path / "triton.log", admin_key=admin_key, **tls) as server:
        url = server.settings.grpc_url
        with ScoringClient(url, ssl=True, root_certificates=pki / "ca.pem") as client:
            np.testing.assert_allclose(client.score(_x(32)).positive, expected_scores, atol=1e-5)

        async def score_async() -> np.ndarray:
            async with AsyncScoringClient(url, ssl=True, root_certificates=pki / "ca.pem") as client:
                return (await client.score(_x(32))).positive

        np.testing.assert_allclose(asyncio.run(score_async()), expected_scores, atol=1e-5)
        with AdminClient.from_settings(server.settings, root_certificates=pki / "ca.pem") as admin:
            assert admin.model_ready(MODEL) and admin.repository_index()[0].state == "READY"
        with ScoringClient(url, retries=1, backoff_s=0.01) as plain, pytest.raises(ScoringError, match="ssl=True"):
            plain.score(_x())
        with ScoringClient(url, retries=0, ssl=True) as untrusted, pytest.raises(ScoringError, match="UNAVAILABLE"):
            untrusted.score(_x())


@pytest.mark.triton
def test_mutual_tls_requires_a_client_certificate(trained, tmp_path, pki, expected_scores):
    tls = {"grpc_use_ssl_mutual": True, "grpc_server_cert": pki / "server.pem",
           "grpc_server_key": pki / "server.key", "grpc_root_cert": pki / "ca.pem"}
    with serving(trained.ws, tmp_path / "triton.log", **tls) as server:
        url = server.settings.grpc_url
        with ScoringClient(url, retries=0, ssl=True, root_certificates=pki / "ca.pem") as anonymous:
            with pytest.raises(ScoringError, match="UNAVAILABLE"):
                anonymous.score(_x())
        with ScoringClient(url, ssl=True, root_certificates=pki / "ca.pem", private_key=pki / "client.key",
                           certificate_chain=pki / "client.pem") as client:
            np.testing.assert_allclose(client.score(_x(32)).positive, expected_scores, atol=1e-5)
