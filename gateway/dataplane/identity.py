"""Who is calling: one `Caller` per call, from a JWT bearer token (PyJWT, keys from a JWKS file),
a verified TLS client certificate (subject CN or URI SAN, e.g. a SPIFFE ID), or anonymous where
the config allows it (docs/security.md).

The token never leaves this module: not in logs, errors, metrics or traces; only the caller's id
does. Verified tokens are remembered until they expire (by their SHA-256, at most
`MAX_REMEMBERED`), so a caller's repeated token costs one signature check, and a flood of
distinct forged tokens costs each its check and is never remembered."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import pathlib
import time
from dataclasses import dataclass

import grpc
import jwt
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.durations import seconds
from gateway.errors import GatewayError
from tensorgate.config.v1 import config_pb2

log = logging.getLogger(__name__)

ANONYMOUS_ID = "anonymous"
MAX_TOKEN_BYTES = 4096  # a JWT larger than this is refused before it is parsed (typical: <2 KiB)
MAX_ID_CHARS = 256  # a caller id longer than this (a claim, a certificate name) is refused
MAX_REMEMBERED = 10_000
DEFAULT_ALGORITHMS = ("RS256", "ES256")
# Never accepted, whatever the config lists: "none" is no signature, and an HMAC algorithm would
# let a public key be used as a shared secret (the classic algorithm-confusion attack).
REFUSED_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})
DEFAULT_CLOCK_SKEW_S = 30.0
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True, slots=True)
class Caller:
    id: str  # the JWT subject, the certificate's name, or "anonymous"
    groups: frozenset[str] = frozenset()
    via: str = "anonymous"  # "jwt", "client_cert" or "anonymous"


ANONYMOUS = Caller(ANONYMOUS_ID)


def _refused(reason: str) -> GatewayError:
    return GatewayError(UNAUTHENTICATED, f"caller not identified: {reason}")


@dataclass(frozen=True)
class _Issuer:
    issuer: str
    audiences: tuple[str, ...]
    keys: dict  # kid -> PyJWK
    algorithms: tuple[str, ...]
    leeway: float
    subject_claim: str
    groups_claim: str


def load_issuer(config: config_pb2.JwtIssuer) -> _Issuer:
    """Raises ValueError saying what is wrong with the JWKS file (checked by check-config)."""
    try:
        document = json.loads(pathlib.Path(config.jwks_file).read_text())
    except OSError as err:
        raise ValueError(f"cannot read {config.jwks_file}: {err.strerror}") from None
    except ValueError:
        raise ValueError(f"{config.jwks_file} is not JSON") from None
    try:
        keys = jwt.PyJWKSet.from_dict(document).keys
    except jwt.PyJWTError as err:
        raise ValueError(f"{config.jwks_file} holds no usable key ({err})") from None
    if any(k.key_id is None for k in keys) and len(keys) > 1:
        raise ValueError(f"{config.jwks_file}: with several keys, each needs a `kid`")
    return _Issuer(
        issuer=config.issuer,
        audiences=tuple(config.audiences),
        keys={k.key_id: k for k in keys},
        algorithms=tuple(config.algorithms) or DEFAULT_ALGORITHMS,
        leeway=seconds(config.clock_skew, DEFAULT_CLOCK_SKEW_S),
        subject_claim=config.subject_claim or "sub",
        groups_claim=config.groups_claim,
    )


class Identifier:
    """Turns a call's metadata and TLS peer into a Caller, or refuses it (UNAUTHENTICATED)."""

    def __init__(self, config: config_pb2.Callers) -> None:
        self.enabled = config.ByteSize() > 0
        self._issuers = {i.issuer: load_issuer(i) for i in config.jwt}
        self._client_cert = config.HasField("client_cert")
        self._cn = config.client_cert.source == config_pb2.ClientCertIdentity.SOURCE_SUBJECT_CN
        self._anonymous = config.allow_anonymous or not self.enabled
        self._remembered: collections.OrderedDict[bytes, tuple[float, Caller]] = (
            collections.OrderedDict()
        )
        self._certs: collections.OrderedDict[bytes, Caller] = collections.OrderedDict()

    def identify(self, metadata, auth_context=None) -> Caller:
        if not self.enabled:
            return ANONYMOUS
        token = None
        if self._issuers:  # no issuer configured: an authorization header is not ours to read
            for key, value in metadata or ():
                if key == "authorization":
                    token = value
                    break
        if token is not None:
            return self._from_token(token)
        if self._client_cert and auth_context:
            pem = auth_context.get("x509_pem_cert")
            if pem:
                return self._from_certificate(pem[0])
        if self._anonymous:
            return ANONYMOUS
        ways = []
        if self._issuers:
            ways.append("a bearer token (metadata `authorization: Bearer <JWT>`)")
        if self._client_cert:
            ways.append("a TLS client certificate")
        raise _refused(f"this gateway needs {' or '.join(ways) or 'a credential'}")

    def _from_token(self, header: str | bytes) -> Caller:
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if len(header) > MAX_TOKEN_BYTES:
            raise _refused(f"the authorization header is over {MAX_TOKEN_BYTES} bytes")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _refused("the authorization header must be `Bearer <JWT>`")
        token = token.strip()
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._remembered.get(digest)
        now = time.time()
        if hit is not None and hit[0] > now:
            return hit[1]
        caller, expires = self._verify(token)
        self._remembered[digest] = (expires, caller)
        self._remembered.move_to_end(digest)
        while len(self._remembered) > MAX_REMEMBERED:
            self._remembered.popitem(last=False)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        if not self._issuers:
            raise _refused("this gateway accepts no bearer tokens (callers.jwt is not configured)")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _refused("the bearer token is not a JWT") from None
        algorithm = header.get("alg")
        named = claims.get("iss")
        issuer = self._issuers.get(named) if isinstance(named, str) else None
        if issuer is None:
            raise _refused("the token's issuer is not one this gateway trusts")
        if algorithm in REFUSED_ALGORITHMS or algorithm not in issuer.algorithms:
            raise _refused(f"the token's algorithm is not accepted (accepted: {issuer.algorithms})")
        key = issuer.keys.get(header.get("kid"))
        if key is None and len(issuer.keys) == 1 and header.get("kid") is None:
            key = next(iter(issuer.keys.values()))
        if key is None:
            raise _refused("the token's key id is not in the issuer's JWKS")
        try:
            verified = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                leeway=issuer.leeway,
                options={"require": ["exp", "iss", "aud", issuer.subject_claim]},
            )
        except jwt.ExpiredSignatureError:
            raise _refused("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise _refused("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise _refused("the token's audience is not this gateway's") from None
        except jwt.InvalidSignatureError:
            raise _refused("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as err:
            raise _refused(f"the token has no {err.claim!r} claim") from None
        except jwt.PyJWTError:
            raise _refused("the token does not verify") from None
        subject = verified.get(issuer.subject_claim)
        if not isinstance(subject, str) or not subject or len(subject) > MAX_ID_CHARS:
            raise _refused(f"the token's {issuer.subject_claim!r} is not a name of 1-256 chars")
        groups = verified.get(issuer.groups_claim) if issuer.groups_claim else None
        if isinstance(groups, str):
            groups = [groups]
        groups = frozenset(g for g in groups or () if isinstance(g, str) and len(g) <= MAX_ID_CHARS)
        return Caller(subject, groups, "jwt"), float(verified["exp"])

    def _from_certificate(self, pem: bytes) -> Caller:
        digest = hashlib.sha256(pem).digest()
        caller = self._certs.get(digest)
        if caller is not None:
            return caller
        cert = x509.load_pem_x509_certificate(pem)
        name = None
        if self._cn:
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            name = names[0].value if names else None
        else:
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            except x509.ExtensionNotFound:
                san = None
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier) if san else []
            name = uris[0] if uris else None
        if not isinstance(name, str) or not name or len(name) > MAX_ID_CHARS:
            what = "subject CN" if self._cn else "URI subject alternative name"
            raise _refused(f"the client certificate has no {what} of 1-256 chars")
        caller = Caller(name, frozenset(), "client_cert")
        self._certs[digest] = caller
        while len(self._certs) > 1024:
            self._certs.popitem(last=False)
        return caller
