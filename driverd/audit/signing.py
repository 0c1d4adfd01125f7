"""Ed25519 material for checkpoints: key fingerprints, PEM loading, and the signed checkpoint payload.

Checkpoint signature (documented in README-audit.md): Ed25519 over the canonical JSON bytes of the checkpoint
record with its `hash` and `sig` fields removed. That covers seq, ts, count, head, prev, key_fingerprint and
reason, so no field of a checkpoint can be edited (even with its hash recomputed) without breaking the signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from driverd.audit.canonical import dumps
from driverd.core.errors import AuditError


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 hex of the raw 32-byte public key (what is recorded at log start)."""
    return hashlib.sha256(raw_public(key)).hexdigest()


def public_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public(key)).decode("ascii")


def public_from_b64(text: object) -> Ed25519PublicKey:
    """The `public_key` field of a segment_start record. Raises AuditError when malformed."""
    if not isinstance(text, str):
        raise AuditError("public_key: expected a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise AuditError("public_key: not a base64 raw 32-byte Ed25519 public key") from None


def load_public_pem(path: Path) -> Ed25519PublicKey:
    """A SubjectPublicKeyInfo PEM file (as written by `driverd keys generate`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"--key {path}: cannot read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise AuditError(f"--key {path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"--key {path}: not an Ed25519 public key")
    return key


def checkpoint_payload(record: Mapping[str, Any]) -> bytes:
    return dumps({k: v for k, v in record.items() if k not in ("hash", "sig")})


def sign_checkpoint(key: Ed25519PrivateKey, record: Mapping[str, Any]) -> str:
    return base64.b64encode(key.sign(checkpoint_payload(record))).decode("ascii")


def checkpoint_signature_ok(key: Ed25519PublicKey, record: Mapping[str, Any]) -> bool:
    sig = record.get("sig")
    if not isinstance(sig, str):
        return False
    try:
        raw = base64.b64decode(sig.encode("ascii"), validate=True)
        key.verify(raw, checkpoint_payload(record))
    except (binascii.Error, ValueError, UnicodeEncodeError, InvalidSignature):
        return False
    return True
