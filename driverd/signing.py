"""Ed25519 schedule signatures: key files, signing, and the trust store that verifies pushes.

Not in the core because it touches files. What is signed is `canonical_bytes(signed_content(doc))`
(driverd.core.canonical): the document without its `signature` member.

Key files are PEM: private keys PKCS#8 unencrypted (mode 0600), public keys SubjectPublicKeyInfo (0644), in a
directory created 0700. The modes are set at creation and do not depend on the umask.
A key id is the first 16 hex digits of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from driverd.core.canonical import SIGNATURE_KEY, canonical_bytes, signed_content
from driverd.core.errors import ConfigError, DriverdError, Problem, SignatureError

ALG: Final = "ed25519"
PRIVATE_SUFFIX: Final = ".key"
PUBLIC_SUFFIX: Final = ".pub"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_ID_RE: Final = re.compile(r"[0-9a-f]{16}")
_MAX_KEY_FILE: Final = 16 * 1024
KEY_DIR_MODE: Final = 0o700
PRIVATE_MODE: Final = 0o600
PUBLIC_MODE: Final = 0o644


class KeyFileError(DriverdError):
    """A key file that cannot be created or read (exists already, unreadable, not an Ed25519 key)."""


#: The names these codes had before every refusal code became snake_case. Audit logs written before then carry
#: them in `request_refused` records; they mean the same (docs/operations.md, "Refusal codes").
LEGACY_SIGNATURE_CODES: Final = {"malformed-signature": "malformed_signature", "wrong-alg": "wrong_alg",
                                 "unknown-key": "unknown_key", "bad-signature": "bad_signature"}


def current_code(code: str) -> str:
    """A refusal code as it is named now (an old log's name mapped to the current one)."""
    return LEGACY_SIGNATURE_CODES.get(code, code)


class SignatureRejected(SignatureError):
    """A signature check that failed; `reason` is a stable code.

    Codes: unsigned, malformed_signature, wrong_alg, unknown_key, bad_signature.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{detail} [{reason}]")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(dir: Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.key` (PKCS#8 PEM, 0600) and `<name>.pub` (SPKI PEM) into dir; never overwrite."""
    if not _NAME_RE.fullmatch(name):
        raise KeyFileError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric")
    _make_key_dir(dir)
    priv_path = dir / f"{name}{PRIVATE_SUFFIX}"
    pub_path = dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (priv_path, pub_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    private = Ed25519PrivateKey.generate()
    priv_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create_key_file(priv_path, priv_pem, PRIVATE_MODE)
    _create_key_file(pub_path, pub_pem, PUBLIC_MODE)
    return priv_path, pub_path


def _make_key_dir(dir: Path) -> None:
    # A new key directory (and any missing parent) is 0700: the umask can only narrow the mode given to mkdir.
    # An existing one is left alone (the daemon checks the modes of the keys it uses at start).
    missing: list[Path] = []
    p = dir
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, KEY_DIR_MODE)


def _create_key_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + mode at creation: a private key is never readable by others, not even briefly.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as fh:
        # A umask wider than usual cannot widen a mode given to open(); a stricter one (0077) narrows the public
        # key, which must stay readable: set the intended mode explicitly.
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def _read_key_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > _MAX_KEY_FILE:
            raise KeyFileError(f"{path}: too large to be a key file")
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read ({exc.strerror})") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def sign_document(doc: Mapping[str, object], private_key_path: Path) -> dict[str, object]:
    """A copy of doc with `signature` added (or replaced): Ed25519 over the canonical signed content."""
    private = load_private_key(private_key_path)
    content = signed_content(doc)
    value = private.sign(canonical_bytes(content))
    signed: dict[str, object] = dict(content)
    signed[SIGNATURE_KEY] = {
        "key_id": key_id(private.public_key()),
        "alg": ALG,
        "value": base64.b64encode(value).decode("ascii"),
    }
    return signed


@dataclass(frozen=True)
class TrustStore:
    """The public keys whose signatures the daemon accepts: key id -> key."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def load(cls, dir: Path) -> TrustStore:
        """Every `*.pub` in dir. A file that is not an Ed25519 public key is a ConfigError (no silent skip)."""
        if not dir.is_dir():
            raise ConfigError([Problem(str(dir), "trust-store", "not a directory")])
        keys: dict[str, Ed25519PublicKey] = {}
        problems: list[Problem] = []
        for path in sorted(dir.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                key = load_public_key(path)
            except KeyFileError as exc:
                problems.append(Problem(str(path), "trust-store", str(exc)))
                continue
            keys[key_id(key)] = key
        if problems:
            raise ConfigError(problems)
        return cls(keys=keys)

    def verify(self, doc: Mapping[str, object]) -> str:
        """Return the key id that signed doc, or raise SignatureRejected saying why not."""
        sig = doc.get(SIGNATURE_KEY)
        if sig is None:
            raise SignatureRejected("unsigned", "document has no signature")
        if not isinstance(sig, Mapping):
            raise SignatureRejected("malformed_signature", "signature must be an object {key_id, alg, value}")
        extra = set(sig) - {"key_id", "alg", "value"}
        if extra:
            names = ", ".join(sorted(repr(k)[:40] for k in extra))
            raise SignatureRejected("malformed_signature", f"unknown signature field(s): {names}")
        alg, kid, value = sig.get("alg"), sig.get("key_id"), sig.get("value")
        if not isinstance(alg, str) or not isinstance(kid, str) or not isinstance(value, str):
            raise SignatureRejected("malformed_signature", "signature needs string fields key_id, alg and value")
        if alg != ALG:
            raise SignatureRejected("wrong_alg", f"signature algorithm must be {ALG!r}")
        if not _KEY_ID_RE.fullmatch(kid):
            raise SignatureRejected("malformed_signature", "key_id must be 16 lowercase hex digits")
        try:
            raw = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise SignatureRejected("malformed_signature", "signature value is not valid base64") from None
        if len(raw) != 64:
            raise SignatureRejected("malformed_signature", f"an Ed25519 signature is 64 bytes, got {len(raw)}")
        key = self.keys.get(kid)
        if key is None:
            raise SignatureRejected("unknown_key", f"key id {kid} is not in the trust store")
        try:
            message = canonical_bytes(signed_content(doc))
        except (TypeError, ValueError) as exc:
            raise SignatureRejected("malformed_signature", f"document has no canonical form: {exc}") from None
        try:
            key.verify(raw, message)
        except InvalidSignature:
            detail = "signature does not match the document (altered after signing?)"
            raise SignatureRejected("bad_signature", detail) from None
        return kid
