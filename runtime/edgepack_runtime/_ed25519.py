"""Pure-Python Ed25519 signature verification (RFC 8032, section 5.1.7).

Devices verify bundles without ``cryptography`` (it is a large native dependency that
many small boards cannot install), so this module implements only the verifier, in
the standard library. Signing stays on the workstation, where ``cryptography`` does
it; verification handles public data only, so plain big-integer arithmetic that is
not constant-time is acceptable here.

Strictness beyond "the equation holds", as RFC 8032 requires:
  * S must be canonical (S < L), otherwise a signature would have malleable twins;
  * R and A must decode as points (y < p, x recoverable, no "negative zero").
The group equation is the cofactored one, [8][S]B == [8]R + [8][k]A.
"""

from __future__ import annotations

import hashlib

__all__ = ["decode_point", "verify"]

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_D2 = (2 * _D) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

# Points are extended homogeneous coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z and
# x*y = T/Z, which gives the cheapest complete addition law for a = -1.
_Point = tuple  # (int, int, int, int)
_IDENTITY = (0, 1, 1, 0)


def _add(p: _Point, q: _Point) -> _Point:
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = t1 * _D2 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _double(p: _Point) -> _Point:
    x1, y1, z1, _ = p
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1) % _P
    g = a - b
    f = c + g
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _negate(p: _Point) -> _Point:
    x, y, z, t = p
    return (-x % _P, y, z, -t % _P)


def _is_identity(p: _Point) -> bool:
    x, y, z, _ = p
    return x % _P == 0 and (y - z) % _P == 0


def _recover_x(y: int, sign: int) -> int | None:
    # RFC 8032 section 5.1.3, step 2-4.
    yy = y * y % _P
    u = (yy - 1) % _P
    v = (_D * yy + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    vxx = v * x * x % _P
    if vxx == u:
        pass
    elif vxx == (-u) % _P:
        x = x * _SQRT_M1 % _P
    else:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x


def decode_point(data: bytes) -> _Point | None:
    """Decode a 32-byte compressed point (RFC 8032 section 5.1.3).

    Args:
        data: The encoding: little-endian y with the sign of x in the top bit.

    Returns:
        The point in extended coordinates, or None if ``data`` is not a valid
        encoding (wrong length, y >= p, no square root, or x = 0 with sign 1).
    """
    if len(data) != 32:
        return None
    n = int.from_bytes(data, "little")
    sign = n >> 255
    y = n & ((1 << 255) - 1)
    if y >= _P:
        return None
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


_B = decode_point(bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666"))


def _double_scalar_mult(s: int, p: _Point, k: int, q: _Point) -> _Point:
    # Straus-Shamir: one shared chain of doublings for [s]P + [k]Q roughly halves the
    # cost of two separate ladders. Timing leaks are irrelevant: all inputs are public.
    pq = _add(p, q)
    acc = _IDENTITY
    for i in range(max(s.bit_length(), k.bit_length()) - 1, -1, -1):
        acc = _double(acc)
        bits = ((s >> i) & 1) | (((k >> i) & 1) << 1)
        if bits == 1:
            acc = _add(acc, p)
        elif bits == 2:
            acc = _add(acc, q)
        elif bits == 3:
            acc = _add(acc, pq)
    return acc


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Check an Ed25519 signature (RFC 8032 section 5.1.7).

    Args:
        public_key: The raw 32-byte public key A.
        message: The exact bytes that were signed.
        signature: The 64-byte signature R || S.

    Returns:
        True if the signature is valid for ``message`` under ``public_key``; False for
        any invalid input, including malformed keys and non-canonical signatures.
    """
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = decode_point(public_key)
    if a is None:
        return False
    r_bytes, s_bytes = signature[:32], signature[32:]
    r = decode_point(r_bytes)
    if r is None:
        return False
    s = int.from_bytes(s_bytes, "little")
    if s >= _L:
        return False
    k = int.from_bytes(hashlib.sha512(r_bytes + public_key + message).digest(), "little") % _L
    # [S]B - [k]A - R must be a small-order point; multiplying by the cofactor 8 then
    # gives the identity exactly when the RFC's cofactored equation holds.
    diff = _add(_double_scalar_mult(s, _B, k, _negate(a)), _negate(r))
    for _ in range(3):
        diff = _double(diff)
    return _is_identity(diff)
