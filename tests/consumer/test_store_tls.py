"""The result store and the SDK over HTTPS, with a certificate from a private CA.

Owns the check that MINIO_CA_FILE reaches every client of the store, that a certificate the
node cannot verify fails at once with a message naming the setting, and the test CA itself.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from minio import Minio
from pydantic import SecretStr

from i2v_fleet.connection import ObjectStoreSettings, free_port
from i2v_fleet.consumer.errors import StorageFailed
from i2v_fleet.consumer.settings import WorkerSettings
from i2v_fleet.consumer.storage import ResultStore, StoreConfig
from i2v_fleet.producer_sdk.client import _image_source
from i2v_fleet.producer_sdk.devstack import DevStack, StackConfig
from i2v_fleet.schemas import MAX_BASE64_IMAGE_BYTES

pytestmark = pytest.mark.minio


def write_test_ca(folder: Path) -> Path:
    """A private CA (`ca.pem`) and a server certificate it signed for 127.0.0.1 and
    localhost (`cert.pem`, `key.pem`) in `folder`, as `StackConfig.tls_dir` wants them.
    Returns the CA's file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "i2v-fleet test CA")])
    ca = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=start,
            not_valid_after=end,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=start,
            not_valid_after=end,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(cert.public_bytes(pem))
    (folder / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "ca.pem"


@pytest.fixture(scope="module")
def https_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """A local stack whose S3 server speaks only HTTPS, with a certificate of a private CA;
    its broker keeps its log there too, so the broker's S3 client trusts the CA as well."""
    tls_dir = tmp_path_factory.mktemp("tls")
    write_test_ca(tls_dir)
    stack = DevStack(
        StackConfig(
            state_dir=tmp_path_factory.mktemp("https-stack"),
            kafka_port=free_port(),
            s3_port=free_port(),
            partitions=1,
            bucket=f"i2v-tls-{uuid.uuid4().hex[:8]}",
            tls_dir=tls_dir,
            durable=True,
        )
    )
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def _download(url: str, stack: DevStack) -> bytes:
    context = ssl.create_default_context(cafile=stack.config.ca_file)
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return bytes(response.read())


def _config(stack: DevStack, **overrides: Any) -> StoreConfig:
    """The store's config as a node builds it from its MINIO_* settings (`overrides`)."""
    c = stack.config
    fields: dict[str, Any] = {
        "endpoint": c.s3_endpoint,
        "access_key": c.access_key,
        "secret_key": SecretStr(c.secret_key),
        "bucket": f"i2v-tls-{uuid.uuid4().hex[:8]}",
        "secure": True,
        "ca_file": str(c.ca_file),
    }
    settings = ObjectStoreSettings(**(fields | overrides))
    return StoreConfig.from_settings(settings, retries=5, backoff_s=1.0)


async def test_the_store_round_trips_over_https_with_the_private_ca(
    https_stack: DevStack, tmp_path: Path
) -> None:
    """With MINIO_CA_FILE naming the CA, the store creates its bucket, stores a result,
    reads it back and presigns an https URL that downloads the video."""
    store = ResultStore(_config(https_stack))
    await store.ensure_bucket()
    assert await store.ping()
    job_id, video = uuid.uuid4(), tmp_path / "video.mp4"
    video.write_bytes(os.urandom(32 * 1024))
    result = await store.put_result(
        job_id,
        video,
        b"\xff\xd8\xff" + os.urandom(100),
        {"node_id": "n1"},
        width=832,
        height=480,
        num_frames=5,
        fps=16,
        timings={"total": 1.0},
    )
    meta = await store.finished(job_id)
    assert meta is not None
    assert meta["result"]["sha256"] == result.sha256
    assert result.url.startswith("https://")
    assert await asyncio.to_thread(_download, result.url, https_stack) == video.read_bytes()


async def test_a_certificate_it_cannot_verify_fails_at_once_naming_minio_ca_file(
    https_stack: DevStack,
) -> None:
    """Without the CA (the system's CAs only) the store refuses the certificate: one try,
    no backoff, a message that says so and names MINIO_CA_FILE."""
    store = ResultStore(_config(https_stack, ca_file=None))
    start = time.monotonic()
    with pytest.raises(StorageFailed) as caught:
        await store.ensure_bucket()
    assert time.monotonic() - start < 0.9
    message = str(caught.value)
    assert "certificate that could not be verified" in message
    assert "MINIO_CA_FILE" in message
    assert "tries" not in message
    assert not await store.ping()


async def test_an_unreadable_ca_file_fails_at_once_naming_minio_ca_file(
    https_stack: DevStack, tmp_path: Path
) -> None:
    """A MINIO_CA_FILE that does not exist is a setting to fix, not an outage to wait out."""
    store = ResultStore(_config(https_stack, ca_file=str(tmp_path / "missing.pem")))
    start = time.monotonic()
    with pytest.raises(StorageFailed, match=r"CA file that could not be read.*MINIO_CA_FILE"):
        await store.finished(uuid.uuid4())
    assert time.monotonic() - start < 0.9


def test_the_stack_created_its_buckets_over_https(https_stack: DevStack) -> None:
    """`up` made both buckets through the HTTPS endpoint, the broker keeps its log there
    (it created the topics), and the stack exports the CA for clients."""
    c = https_stack.config
    env = c.env()
    assert (env["MINIO_SECURE"], env["MINIO_CA_FILE"]) == ("true", str(c.ca_file))
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(c.ca_file))
    client = Minio(c.s3_endpoint, c.access_key, c.secret_key, secure=True, http_client=http)
    assert client.bucket_exists(c.bucket)
    assert any(client.list_objects(c.broker_bucket, recursive=True))
    assert all(s.healthy for s in https_stack.status())
    assert https_stack.status()[0].storage == f"s3://{c.broker_bucket}/"


def test_worker_and_sdk_settings_read_minio_ca_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """MINIO_CA_FILE loads into both the worker's and the SDK's settings (one class); a
    node's store trusts exactly that file; empty means unset."""
    monkeypatch.setenv("MINIO_CA_FILE", str(tmp_path / "ca.pem"))
    assert ObjectStoreSettings().ca_file == str(tmp_path / "ca.pem")
    worker = WorkerSettings()
    assert worker.object_store.ca_file == str(tmp_path / "ca.pem")
    assert StoreConfig.from_settings(worker.object_store).ca_file == str(tmp_path / "ca.pem")
    monkeypatch.delenv("MINIO_CA_FILE")
    assert ObjectStoreSettings().ca_file is None
    assert WorkerSettings().object_store.ca_file is None
    monkeypatch.setenv("MINIO_CA_FILE", "")
    assert StoreConfig.from_settings(ObjectStoreSettings()).ca_file is None


def test_the_sdk_uploads_a_large_image_over_https(https_stack: DevStack) -> None:
    """An image over the inline cap goes to the bucket through the CA-verified client."""
    c = https_stack.config
    settings = ObjectStoreSettings(
        endpoint=c.s3_endpoint,
        access_key=c.access_key,
        secret_key=SecretStr(c.secret_key),
        bucket=c.bucket,
        secure=True,
        ca_file=str(c.ca_file),
    )
    image = os.urandom(MAX_BASE64_IMAGE_BYTES + 1)
    source = _image_source(image, settings, str(uuid.uuid4()))
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(c.ca_file))
    client = Minio(c.s3_endpoint, c.access_key, c.secret_key, secure=True, http_client=http)
    response = client.get_object(source["s3"]["bucket"], source["s3"]["key"])
    try:
        assert response.read() == image
    finally:
        response.close()
        response.release_conn()
