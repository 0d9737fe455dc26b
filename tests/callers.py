"""Caller credentials for the identity and rate-limit tests: an RSA signing key with its JWKS
file, tokens minted with PyJWT (good ones and every kind of bad one), and client certificates
with a SPIFFE URI (tests/certs.py)."""

from __future__ import annotations

import base64
import json
import pathlib
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://issuer.tensorgate.test"
AUDIENCE = "tensorgate"


class Signer:
    """One issuer key; `jwks` is the file the gateway reads."""

    def __init__(self, directory: pathlib.Path, kid: str = "key-1") -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        public.update(kid=kid, alg="RS256", use="sig")
        self.jwks = directory / f"jwks-{kid}.json"
        self.jwks.write_text(json.dumps({"keys": [public]}))
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, subject: str, *, groups=(), audience=AUDIENCE, issuer=ISSUER,
              expires_in: float = 600, not_before: float | None = None, **claims) -> str:  # fmt: skip
        now = time.time()
        body = {"iss": issuer, "aud": audience, "sub": subject, "exp": int(now + expires_in),
                "iat": int(now), "groups": list(groups), **claims}  # fmt: skip
        if not_before is not None:
            body["nbf"] = int(now + not_before)
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": self.kid})


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def unsigned(subject: str) -> str:
    """alg "none": a token anyone can write."""

    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "exp": int(time.time() + 600)}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(body)}."


def hmac_with_public_key(signer: Signer, subject: str) -> str:
    """HS256 keyed with the issuer's PUBLIC key: the algorithm-confusion forgery."""
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "exp": int(time.time() + 600)}
    import hashlib
    import hmac

    header = {"alg": "HS256", "typ": "JWT", "kid": signer.kid}

    def part(value) -> str:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{part(header)}.{part(body)}"
    mac = hmac.new(signer.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{part(mac)}"


def callers_config(signer: Signer, **extra) -> dict:
    return {
        "jwt": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(signer.jwks),
                 "groups_claim": "groups"}],
        **extra,
    }  # fmt: skip
