"""HTTPS with mutual TLS on a real ``autoglm serve`` (loopback, certificates made in the test): a client
certificate signed by the configured CA is an identity with its scopes; a missing or foreign one is refused."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .certs import CA  # type: ignore[import-not-found]
from .conftest import SERVER_SECRET  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow


def _context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_https_mutual_tls(serve_process: Any, tmp_path: Path) -> None:
    (tmp_path / "rogue").mkdir()
    ca, rogue = CA(tmp_path, "test-ca"), CA(tmp_path / "rogue", "rogue-ca")  # the rogue one reuses the name
    server_cert, server_key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("dashboard", server=False)
    reader_cert, reader_key = ca.issue("stranger", server=False)  # signed by the CA, mapped to nothing
    rogue_cert, rogue_key = rogue.issue("dashboard", server=False)
    config = tmp_path / "tls.yaml"
    tls = {
        "cert_file": str(server_cert), "key_file": str(server_key), "client_ca_file": str(ca.cert_path),
        "require_client_cert": True, "client_identities": {"dashboard": ["models:read"]},
    }  # fmt: skip
    config.write_text(yaml.safe_dump({"gateway": {"tls": tls, "auth": {"secret": SERVER_SECRET}}}))
    good = _context(ca.cert_path, client_cert, client_key)
    server = serve_process({}, ["--config", str(config)], auth=True, https=True, httpx_options={"verify": good})
    with server:
        assert server.url.startswith("https://")
        r = httpx.get(f"{server.url}/v1/models", verify=good)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "demo"
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}, verify=good)
        assert r.status_code == 403  # the certificate's identity has models:read only
        stranger = httpx.get(f"{server.url}/v1/models", verify=_context(ca.cert_path, reader_cert, reader_key))
        assert stranger.status_code == 401
        for ctx in (_context(ca.cert_path), _context(ca.cert_path, rogue_cert, rogue_key)):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                httpx.get(f"{server.url}/v1/models", verify=ctx)
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):  # no plaintext HTTP
            httpx.get(server.url.replace("https://", "http://") + "/healthz", timeout=5).raise_for_status()
