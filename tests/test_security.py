"""A locked-down fleet end to end: TLS (rediss://), an ACL user, signed messages.

A second private Redis speaks TLS only, with the default user off and one ACL user without
admin commands; a real worker (real engine) and producers in their own processes reach it
through a ``rediss://`` URL that verifies the server certificate, and every task and control
message is signed with Celery's auth serializer. An unsigned task is refused.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.localredis import LocalRedis
from tests.harness import Fleet, wait_until

pytestmark = pytest.mark.engine


def _pki(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a message-signing key, all PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key() -> Any:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def cert(name: str, public: Any, issuer: str, signer: Any, ca: bool,
             san: list[x509.GeneralName] | None = None) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(name: str, obj: Any) -> Path:
        path = root / name
        if hasattr(obj, "private_bytes"):
            path.write_bytes(obj.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        else:
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key, server_key, signing_key = key(), key(), key()
    ca = cert("fleet-test-ca", ca_key.public_key(), "fleet-test-ca", ca_key, True)
    server = cert("127.0.0.1", server_key.public_key(), "fleet-test-ca", ca_key, False,
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    signer = cert("fleet-producer", signing_key.public_key(), "fleet-test-ca", ca_key, False)
    (root / "trusted").mkdir()
    return {"ca": write("ca.crt", ca), "server_cert": write("redis.crt", server),
            "server_key": write("redis.key", server_key),
            "signing_key": write("signing.key", signing_key),
            "signing_cert": write("signing.crt", signer),
            "trusted": write("trusted/signing.crt", signer).parent}


@pytest.fixture(scope="module")
def secure(fleet_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[dict[str, str], dict[str, str], LocalRedis, Fleet]]:
    pki = _pki(tmp_path_factory.mktemp("pki"))
    server = LocalRedis(user="fleet", tls=(pki["ca"], pki["server_cert"], pki["server_key"]))
    server.start()
    signed = {**fleet_env, "FLEET_BROKER_URL": server.url,
              "FLEET_SIGNING_KEY": str(pki["signing_key"]),
              "FLEET_SIGNING_CERTIFICATE": str(pki["signing_cert"]),
              "FLEET_SIGNING_CERT_STORE": str(pki["trusted"])}
    unsigned = {k: v for k, v in signed.items() if not k.startswith("FLEET_SIGNING_")}
    fleet = Fleet(signed, tmp_path_factory.mktemp("secure-logs"))
    try:
        yield signed, unsigned, server, fleet
    finally:
        fleet.stop_all()
        server.stop()


def _producer(code: str, env: dict[str, str], timeout: float = 300) -> Any:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tls_acl_user_and_signed_messages_end_to_end(secure: Any) -> None:
    signed, unsigned, server, fleet = secure
    assert server.url.startswith("rediss://fleet:")
    worker = fleet.start("tiny", "sec1")
    result = _producer(
        "import json\n"
        "from producer import generate\n"
        "from producer.client import wait_for_engine\n"
        "wait_for_engine('tiny', timeout=240)\n"
        "print(json.dumps(generate.delay('Write a haiku', model='tiny', max_tokens=4)"
        ".get(timeout=120)))\n", signed)
    assert result["completion_tokens"] == 4
    assert result["engine_id"] == "sec1"

    # An unsigned task reaches the queue but the worker refuses to read it.
    task_id = _producer(
        "import json\n"
        "from producer import generate\n"
        "print(json.dumps(generate.delay('unsigned', model='tiny', max_tokens=2).id))\n",
        unsigned, timeout=60)
    wait_until(lambda: "Refusing to deserialize untrusted content of type json" in worker.log(),
               60, "the unsigned task was not refused", interval=0.3)
    client = redis.Redis.from_url(server.url)
    assert client.get(f"celery-task-meta-{task_id}") is None  # it never ran, wrote nothing
    kept = [json.loads(entry) for entry in client.lrange("fleet.dead.malformed", 0, -1)]
    assert task_id in {entry["id"] for entry in kept}  # an operator sees it
    assert worker.process.poll() is None

    # An unsigned control message is refused the same way: a shutdown nobody signed stops
    # nothing, and the worker goes on serving signed tasks.
    refusals = worker.log().count("Refusing to deserialize untrusted content")
    _producer(
        "import json\n"
        "from producer import app\n"
        f"app.control.broadcast('shutdown', destination=['{worker.node}'])\n"
        "print(json.dumps(True))\n", unsigned, timeout=60)
    wait_until(lambda: worker.log().count("Refusing to deserialize untrusted content") > refusals,
               60, "the unsigned control message was not refused", interval=0.3)
    after = _producer(
        "import json\n"
        "from producer import generate\n"
        "print(json.dumps(generate.delay('still here', model='tiny', max_tokens=3)"
        ".get(timeout=120)))\n", signed)
    assert after["completion_tokens"] == 3 and after["engine_id"] == "sec1"
    assert worker.process.poll() is None

    # Nobody gets in without the ACL user's password, nor without TLS, nor as admin.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(server.url.replace(f":{server.password}@", ":wrong@")).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(f"redis://fleet:{server.password}@127.0.0.1:{server.port}/0",
                             socket_timeout=3).ping()
    with pytest.raises(redis.ResponseError, match=r"permissions"):
        client.flushall()
