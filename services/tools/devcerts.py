"""Throwaway certificates for trying TLS and mutual TLS (tests, demos, a dev cluster):
a private CA, one service certificate and one client certificate, made with the
``openssl`` command-line tool. Not for production: use your own PKI there.

    python -m services.tools.devcerts --out certs --san DNS:localhost --san IP:127.0.0.1

writes ``ca.pem``/``ca.key``, ``service.pem``/``service.key`` (serverAuth and clientAuth:
services are both servers and clients of each other) and ``client.pem``/``client.key``
(clientAuth, e.g. for the load generator), and prints the PIPESERVE_TLS_* settings.
See docs/security.md for the same steps as plain openssl commands.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SANS = ("IP:127.0.0.1", "DNS:localhost")


@dataclass(frozen=True)
class DevPki:
    ca: Path
    ca_key: Path
    service_cert: Path
    service_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("the openssl command-line tool is not installed (apt-get install openssl)")
    done = subprocess.run([exe, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def _key_and_csr(key: Path, csr: Path, cn: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    os.chmod(key, 0o600)


def _sign(csr: Path, out: Path, ca: Path, ca_key: Path, ext: str, days: int) -> None:
    ext_file = out.with_suffix(".ext")
    ext_file.write_text(ext)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(out), "-days", str(days), "-sha256", "-extfile", str(ext_file))
    ext_file.unlink()
    csr.unlink()


def make_dev_pki(out: str | Path, sans: tuple[str, ...] | list[str] = DEFAULT_SANS, days: int = 2,
                 ca_name: str = "pipeserve dev CA") -> DevPki:
    """Write a CA, a service certificate for ``sans`` (``IP:...``/``DNS:...``) and a
    client certificate into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pki = DevPki(out / "ca.pem", out / "ca.key", out / "service.pem", out / "service.key",
                 out / "client.pem", out / "client.key")
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(pki.ca_key), "-out", str(pki.ca), "-days", str(days),
             "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    os.chmod(pki.ca_key, 0o600)
    _key_and_csr(pki.service_key, out / "service.csr", "pipeserve-service")
    _sign(out / "service.csr", pki.service_cert, pki.ca, pki.ca_key,
          f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth,clientAuth\n"
          "keyUsage=critical,digitalSignature\n", days)
    _key_and_csr(pki.client_key, out / "client.csr", "pipeserve-client")
    _sign(out / "client.csr", pki.client_cert, pki.ca, pki.ca_key,
          "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n", days)
    return pki


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m services.tools.devcerts",
        description="Write a throwaway CA, a service certificate and a client certificate "
                    "(ECDSA P-256, made with the openssl tool) for trying TLS and mutual TLS. "
                    "Not for production.")
    p.add_argument("--out", default="certs", help="directory to write into (default: %(default)s)")
    p.add_argument("--san", action="append", default=[], metavar="IP:ADDR|DNS:NAME",
                   help="a name the service certificate is valid for, once per name: every "
                        "address the services are called by (default: IP:127.0.0.1 and DNS:localhost)")
    p.add_argument("--days", type=int, default=30, help="validity in days (default: %(default)s)")
    a = p.parse_args(argv)
    bad = [s for s in a.san if not s.startswith(("IP:", "DNS:"))]
    if bad:
        p.error(f"--san takes IP:ADDR or DNS:NAME, got {bad}")
    try:
        pki = make_dev_pki(a.out, tuple(a.san) or DEFAULT_SANS, days=a.days)
    except (RuntimeError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"export PIPESERVE_TLS_CERT={pki.service_cert.resolve()}\n"
          f"export PIPESERVE_TLS_KEY={pki.service_key.resolve()}\n"
          f"export PIPESERVE_TLS_CA={pki.ca.resolve()}\n"
          f"export PIPESERVE_TLS_CLIENT_AUTH=1\n"
          f"# a client (pipeserve-loadgen): --tls-ca {pki.ca} --tls-cert {pki.client_cert} "
          f"--tls-key {pki.client_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
