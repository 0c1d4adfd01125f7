"""Ed25519 signing: key files, sign -> verify, every rejection reason, and tamper detection."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import stat
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from driverd.core.errors import ConfigError, SignatureError
from driverd.core.schedule_parse import load_json
from driverd.signing import (
    KeyFileError,
    SignatureRejected,
    TrustStore,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_document,
)

from .conftest import CONFIG, DEMO_KEY, DEMO_TRUST

MakeDoc = Callable[[], dict[str, Any]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TrustStore]:
    """A signer whose .pub is in a trust store, and a second key that is not trusted."""
    base = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(base / "signer", "pharmacy")
    other_priv, _ = generate_keypair(base / "other", "stranger")
    trust = base / "trusted"
    trust.mkdir()
    (trust / pub.name).write_bytes(pub.read_bytes())
    return priv, other_priv, TrustStore.load(trust)


def reason(store: TrustStore, doc: Any) -> str:
    with pytest.raises(SignatureRejected) as info:
        store.verify(doc)
    assert isinstance(info.value, SignatureError)
    return info.value.reason


# --- key files ----------------------------------------------------------------------------------------------


def test_generate_writes_pem_pair(tmp_path: Path) -> None:
    priv, pub = generate_keypair(tmp_path / "new", "ward-signer")
    assert priv.name == "ward-signer.key" and pub.name == "ward-signer.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    public = load_public_key(pub)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key_id(public) == hashlib.sha256(raw).hexdigest()[:16]
    assert key_id(load_private_key(priv).public_key()) == key_id(public)


def test_generate_never_overwrites(tmp_path: Path) -> None:
    priv, _ = generate_keypair(tmp_path, "k")
    before = priv.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path, "k")
    assert priv.read_bytes() == before


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 65, "sp ace", "nul\x00"])
def test_generate_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError):
        generate_keypair(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_load_private_key_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    with pytest.raises(KeyFileError):
        load_private_key(bad)
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "missing.key")


# --- trust store --------------------------------------------------------------------------------------------


def test_trust_store_loads_only_pub_files(tmp_path: Path) -> None:
    _, pub = generate_keypair(tmp_path, "a")
    (tmp_path / "notes.txt").write_text("ignored")
    store = TrustStore.load(tmp_path)
    assert list(store.keys) == [key_id(load_public_key(pub))]


def test_trust_store_refuses_bad_pub(tmp_path: Path) -> None:
    (tmp_path / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError) as info:
        TrustStore.load(tmp_path)
    assert info.value.problems[0].rule == "trust-store"


def test_trust_store_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TrustStore.load(tmp_path / "nope")


# --- sign / verify ------------------------------------------------------------------------------------------


def test_sign_verify_round_trip(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    priv, _, store = keys
    signed = sign_document(doc, priv)
    assert "signature" not in doc  # the input is not modified
    sig = signed["signature"]
    assert sig["alg"] == "ed25519" and len(base64.b64decode(sig["value"])) == 64
    assert store.verify(signed) == sig["key_id"]
    # re-signing replaces the signature
    assert sign_document(signed, priv)["signature"] == sig  # Ed25519 is deterministic


def test_verify_survives_reserialization(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    priv, _, store = keys
    signed = sign_document(doc, priv)
    text = json.dumps(dict(reversed(list(signed.items()))), indent=3, default=str)  # numbers here are strings
    assert store.verify(json.loads(text, parse_float=Decimal)) == signed["signature"]["key_id"]


def test_unsigned(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    assert reason(keys[2], doc) == "unsigned"


def test_wrong_key(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    _, other, store = keys
    assert reason(store, sign_document(doc, other)) == "unknown_key"


def test_key_id_of_trusted_key_but_signed_by_another(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    priv, other, store = keys
    forged = sign_document(doc, other)
    forged["signature"]["key_id"] = sign_document(doc, priv)["signature"]["key_id"]
    assert reason(store, forged) == "bad_signature"


def test_altered_after_signing(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    priv, _, store = keys
    signed = sign_document(doc, priv)
    signed["steps"][2]["dose_mg_per_24h"] = "450"
    assert reason(store, signed) == "bad_signature"


def test_wrong_alg(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    signed = sign_document(doc, keys[0])
    signed["signature"]["alg"] = "rsa-sha256"
    assert reason(keys[2], signed) == "wrong_alg"


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: "signed",
        lambda s: [s],
        lambda s: {**s, "extra": 1},
        lambda s: {k: v for k, v in s.items() if k != "value"},
        lambda s: {**s, "value": "!!!not base64!!!"},
        lambda s: {**s, "value": base64.b64encode(b"short").decode()},
        lambda s: {**s, "value": "é" * 88},
        lambda s: {**s, "key_id": "NOT-HEX"},
        lambda s: {**s, "key_id": 12},
    ],
)
def test_malformed_signature(
    doc: dict[str, Any], keys: tuple[Path, Path, TrustStore], damage: Callable[[dict[str, Any]], object]
) -> None:
    signed = sign_document(doc, keys[0])
    signed["signature"] = damage(signed["signature"])
    assert reason(keys[2], signed) == "malformed_signature"


def test_float_in_document_is_refused_not_crashed(doc: dict[str, Any], keys: tuple[Path, Path, TrustStore]) -> None:
    signed = sign_document(doc, keys[0])
    signed["hold_days"] = 3.0
    assert reason(keys[2], signed) == "malformed_signature"


def _leaf_paths(node: Any, base: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, (*base, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*base, i))]
    return [base]


@settings(max_examples=100)
@given(data=st.data())
def test_any_single_field_mutation_breaks_the_signature(
    make_doc: MakeDoc, keys: tuple[Path, Path, TrustStore], data: st.DataObject
) -> None:
    priv, _, store = keys
    signed = sign_document(make_doc(), priv)
    tampered = copy.deepcopy(signed)
    paths = [p for p in _leaf_paths(tampered) if p[0] != "signature"]
    path = data.draw(st.sampled_from(paths))
    node: Any = tampered
    for p in path[:-1]:
        node = node[p]
    old = node[path[-1]]
    new = data.draw(
        st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.none(), st.just(f"{old}x")).filter(
            lambda v: not (v == old and type(v) is type(old))
        )
    )
    node[path[-1]] = new
    assert reason(store, tampered) == "bad_signature"


# --- the committed demo artefacts ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["example", "example-confirm"])
def test_committed_signed_examples_verify(name: str) -> None:
    store = TrustStore.load(DEMO_TRUST)
    signed = load_json((CONFIG / "schedules" / f"{name}.signed.json").read_bytes())
    unsigned = load_json((CONFIG / "schedules" / f"{name}.json").read_bytes())
    assert isinstance(signed, dict) and isinstance(unsigned, dict)
    kid = store.verify(signed)
    assert kid == key_id(load_private_key(DEMO_KEY).public_key())
    assert {k: v for k, v in signed.items() if k != "signature"} == unsigned


def test_demo_key_is_clearly_named() -> None:
    assert "NOT-FOR-CLINICAL-USE" in DEMO_KEY.name
    assert "NOT FOR CLINICAL USE" in (DEMO_KEY.parent / "README.md").read_text(encoding="utf-8")
