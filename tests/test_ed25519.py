"""The device's pure-Python Ed25519 verifier against RFC 8032 and against OpenSSL."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack_runtime import _ed25519

L = 2**252 + 27742317777372353535851937790883648493
P = 2**255 - 19

# RFC 8032 section 7.1, TEST 1-3: (secret key, public key, message, signature).
RFC8032_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.mark.parametrize("secret,public,message,signature", RFC8032_VECTORS, ids=["test1", "test2", "test3"])
def test_rfc8032_vectors_verify(secret: str, public: str, message: str, signature: str) -> None:
    assert _ed25519.verify(bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature))


@pytest.mark.parametrize("secret,public,message,signature", RFC8032_VECTORS, ids=["test1", "test2", "test3"])
def test_rfc8032_vectors_match_openssl_signer(secret: str, public: str, message: str, signature: str) -> None:
    # Guards the vectors themselves: OpenSSL must derive the same key and signature.
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert _raw_public(key).hex() == public
    assert key.sign(bytes.fromhex(message)).hex() == signature


@pytest.mark.parametrize("secret,public,message,signature", RFC8032_VECTORS, ids=["test1", "test2", "test3"])
def test_rfc8032_vectors_reject_any_single_bit_flip_in_signature(secret: str, public: str, message: str, signature: str) -> None:
    sig = bytes.fromhex(signature)
    for bit in range(0, 512, 7):
        bad = bytearray(sig)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert not _ed25519.verify(bytes.fromhex(public), bytes.fromhex(message), bytes(bad))


def test_signatures_made_by_openssl_verify_and_tampering_is_rejected() -> None:
    rng = random.Random(8032)
    keys = [Ed25519PrivateKey.generate() for _ in range(8)]
    for i in range(40):
        key, other = keys[i % 8], keys[(i + 1) % 8]
        message = rng.randbytes(rng.choice([0, 1, 31, 64, 200, 1000]))
        sig = key.sign(message)
        public = _raw_public(key)
        assert _ed25519.verify(public, message, sig), "genuine signature rejected"
        assert not _ed25519.verify(_raw_public(other), message, sig), "wrong key accepted"
        bad_sig = bytearray(sig)
        bit = rng.randrange(512)
        bad_sig[bit // 8] ^= 1 << (bit % 8)
        assert not _ed25519.verify(public, message, bytes(bad_sig)), "flipped signature bit accepted"
        if message:
            bad_msg = bytearray(message)
            bit = rng.randrange(len(message) * 8)
            bad_msg[bit // 8] ^= 1 << (bit % 8)
            assert not _ed25519.verify(public, bytes(bad_msg), sig), "flipped message bit accepted"
        assert not _ed25519.verify(public, message + b"\0", sig), "extended message accepted"


def test_non_canonical_s_is_rejected_against_malleability() -> None:
    # S + L satisfies the group equation too; RFC 8032 requires rejecting S >= L so
    # one signature cannot have twins.
    secret, public, message, signature = RFC8032_VECTORS[0]
    sig = bytes.fromhex(signature)
    s = int.from_bytes(sig[32:], "little")
    twin = sig[:32] + (s + L).to_bytes(32, "little")
    assert not _ed25519.verify(bytes.fromhex(public), bytes.fromhex(message), twin)
    assert not _ed25519.verify(bytes.fromhex(public), bytes.fromhex(message), sig[:32] + L.to_bytes(32, "little"))


def _non_square_y() -> int:
    # Smallest y whose x^2 = (y^2 - 1) / (d y^2 + 1) has no root: not a curve point.
    y = 2
    while _ed25519.decode_point(y.to_bytes(32, "little")) is not None:
        y += 1
    return y


def test_points_that_fail_to_decode_are_rejected() -> None:
    secret, public, message, signature = RFC8032_VECTORS[1]
    pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    off_curve = _non_square_y().to_bytes(32, "little")
    y_too_big = (P + 1).to_bytes(32, "little")  # y >= p: non-canonical encoding of y = 1
    negative_zero = (1 | (1 << 255)).to_bytes(32, "little")  # y = 1 gives x = 0, sign bit 1 is invalid
    for bad in (off_curve, y_too_big, negative_zero):
        assert _ed25519.decode_point(bad) is None
        assert not _ed25519.verify(bad, msg, sig), "undecodable public key accepted"
        assert not _ed25519.verify(pub, msg, bad + sig[32:]), "undecodable R accepted"


def test_wrong_lengths_are_rejected_not_raised() -> None:
    secret, public, message, signature = RFC8032_VECTORS[2]
    pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert not _ed25519.verify(pub[:31], msg, sig)
    assert not _ed25519.verify(pub + b"\0", msg, sig)
    assert not _ed25519.verify(pub, msg, sig[:63])
    assert not _ed25519.verify(pub, msg, sig + b"\0")


def test_verifier_module_uses_only_the_standard_library() -> None:
    source = open(_ed25519.__file__, encoding="utf-8").read()
    imports = {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "hashlib"}, imports
