"""TLS whose certificate *is* the key that signs a node's DHT records, so an endpoint belongs to its announcer.

A node's TLS certificate is self-signed with its record-signing RSA key (``make_certificate``).
Its endpoints are announced as ``tls:FP@host:port`` (``dmoe.wire.endpoints``), where ``FP`` is
``key_fingerprint`` of that key, and the registry keeps such an entry only if ``FP`` is the
fingerprint of the entry's owner (the key in its signed subkey). The certificate itself is in the
DHT under ``_dmoe.cert.FP`` (``dmoe.dht.registry``); a client checks that its key has fingerprint
``FP`` and then pins it as the only trusted root for that endpoint. So:

* a record pointing an expert at someone else's endpoint cannot name that endpoint's key (the
  entry is dropped: its owner is not that key) and cannot make it present another one (the
  handshake fails: that server has no such key);
* a man in the middle (a proxy presenting another certificate) fails the handshake;
* relays (``dmoe.relay``) carry the TLS bytes without being able to read or alter them.

Certificates name ``TLS_NAME`` (every node alike): identity is the pinned key, not a host name.
"""

from __future__ import annotations

import datetime
import functools
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

TLS_NAME = "dmoe-node"
FINGERPRINT_HEX = 32  # hex digits of a key fingerprint (128 bits)


@functools.lru_cache(maxsize=4096)  # every lookup fingerprints the owner of every entry it reads
def key_fingerprint(openssh_public_key: bytes) -> str:
    """Fingerprint of a public key in OpenSSH form (what DHT owner markers carry)."""
    return hashlib.sha256(openssh_public_key).hexdigest()[:FINGERPRINT_HEX]


def public_key_fingerprint(key: rsa.RSAPublicKey) -> str:
    return key_fingerprint(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def make_certificate(key: rsa.RSAPrivateKey) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM): a self-signed certificate for ``key``, valid for a century."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)])
    fingerprint = public_key_fingerprint(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int(fingerprint, 16))
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2120, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(cert_pem: bytes) -> str | None:
    """Fingerprint of the key a PEM certificate carries; None if it is no RSA certificate."""
    try:
        key = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError:
        return None
    return public_key_fingerprint(key) if isinstance(key, rsa.RSAPublicKey) else None
