"""What a startup kit is made of: its folders and file names, limits, and the error type.

A kit is a folder named after its participant::

    <name>/
      README.txt        what this kit is and how to use it (not signed)
      startup/          identity and connection; signed by the project CA
        kit.json        project, participant, server host/port (JSON, see docs/provisioning.md)
        cert.pem        this participant's certificate
        key.pem         its private key (mode 0600; never in the manifest: it is checked
                        against cert.pem instead, so a site-held key fits the same scheme)
        rootCA.pem      the project CA certificate
        he_context.secret  sites, when the project uses homomorphic encryption: the CKKS
                        context with its secret key (mode 0600); the server kit has
                        he_context.public instead (no secret key); both are signed
        start.sh stop.sh  (server and sites)
        MANIFEST.json   SHA-256 of every other startup/ file, the CA's fingerprint
        MANIFEST.sig    the CA's signature over MANIFEST.json's exact bytes
      local/            the site's own policy (authorization, privacy, resources): not signed
      transfer/         empty; jobs and results pass through here

Shared by :mod:`fedctl.provision.kitfiles` (which writes kits) and :mod:`fedctl.provision.kit`
(which loads and verifies them); imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedctl.errors import ConfigError

KIT_VERSION = 1
STARTUP, LOCAL, TRANSFER = "startup", "local", "transfer"
CONFIG_FILE = "kit.json"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "rootCA.pem"
MANIFEST_FILE = "MANIFEST.json"
HE_SECRET_FILE = "he_context.secret"
HE_PUBLIC_FILE = "he_context.public"
SIGNATURE_FILE = "MANIFEST.sig"
#: startup/ files the manifest does not list (the key is checked against the certificate).
UNLISTED = frozenset({KEY_FILE, MANIFEST_FILE, SIGNATURE_FILE})
MAX_KIT_ZIP_BYTES = 16 << 20
MAX_KIT_ZIP_FILES = 1000
DIRS = (STARTUP, LOCAL, TRANSFER)


class KitError(ConfigError):
    """A kit that is incomplete, tampered with, foreign or otherwise unusable; names the file."""


@dataclass(frozen=True)
class KitFile:
    """One file of a kit to be written: path relative to the kit folder, bytes, POSIX mode."""

    path: str
    data: bytes
    mode: int = 0o644


def hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
