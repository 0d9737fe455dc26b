"""Throwaway PKI for TLS tests, made with the openssl command line."""

from __future__ import annotations

import pathlib
import subprocess


def _run(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-keyout", key.name, "-out", cert.name, cwd=directory)  # fmt: skip
    return key, cert


def issue(
    directory: pathlib.Path,
    ca: tuple[pathlib.Path, pathlib.Path],
    name: str,
    *,
    server: bool,
    uri: str | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    """`uri`: a URI subject alternative name for a client certificate (a SPIFFE ID)."""
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    _run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        key.name,
        "-out",
        csr.name,
        cwd=directory,
    )
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        if server
        else "extendedKeyUsage=clientAuth\n" + (f"subjectAltName=URI:{uri}\n" if uri else "")
    )
    _run("x509", "-req", "-in", csr.name, "-CA", ca[1].name, "-CAkey", ca[0].name, "-CAcreateserial",
         "-days", "2", "-out", cert.name, "-extfile", ext.name, cwd=directory)  # fmt: skip
    return key, cert
