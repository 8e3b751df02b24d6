"""TLS material made by the tests with `cryptography`: a CA and a server certificate it signs
(for localhost and 127.0.0.1), and a self-signed certificate no client trusts."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class ServerCert:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes  # the certificate that verifies cert_pem (cert_pem itself when self-signed)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _server_builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False))


def ca_signed_server_cert() -> ServerCert:
    """A test CA and a server certificate for localhost/127.0.0.1 signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert = (x509.CertificateBuilder()
               .subject_name(_name("parca-agent test CA")).issuer_name(_name("parca-agent test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_server_builder(_name("localhost"), ca_cert.subject, key.public_key())
            .sign(ca_key, hashes.SHA256()))
    return ServerCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key),
                      ca_cert.public_bytes(serialization.Encoding.PEM))


def self_signed_server_cert() -> ServerCert:
    """A certificate for localhost/127.0.0.1 that signs itself: trusted by nobody by default."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_server_builder(_name("localhost"), _name("localhost"), key.public_key())
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return ServerCert(pem, _key_pem(key), pem)
