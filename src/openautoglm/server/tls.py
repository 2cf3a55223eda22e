"""TLS and mutual TLS for both transports: uvicorn SSL options, gRPC server credentials, and the verified client
certificate's common name handed to the gateway (``scope["extensions"]["tls"]["client_cert_cn"]`` on HTTP)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc

from openautoglm.config.gateway import TlsConfig
from openautoglm.protocol.errors import ConfigError


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"gateway.tls.{what}: cannot read {path}: {exc.strerror}") from exc


def uvicorn_ssl_options(tls: TlsConfig) -> dict[str, Any]:
    if not tls.enabled:
        return {}
    for what in ("cert_file", "key_file", "client_ca_file"):
        value = getattr(tls, what)
        if value is not None:
            _read(value, what)  # a clear error at start-up, not uvicorn's traceback
    reqs = ssl.CERT_NONE
    if tls.client_ca_file:
        reqs = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return {
        "ssl_certfile": tls.cert_file,
        "ssl_keyfile": tls.key_file,
        "ssl_ca_certs": tls.client_ca_file,
        "ssl_cert_reqs": reqs,
    }


def grpc_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    pair = (_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))
    ca = _read(tls.client_ca_file, "client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=tls.require_client_cert)


def peer_common_name(ssl_object: ssl.SSLObject | None) -> str | None:
    """The common name of the client certificate, present only when it verified against the client CA."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def with_client_certificates(protocol: type) -> type:
    """A uvicorn HTTP protocol class that passes each connection's verified client certificate to the app."""

    class _ClientCertProtocol(protocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            common_name = peer_common_name(transport.get_extra_info("ssl_object"))
            if common_name is None:
                return
            inner = self.app

            async def app(scope: Any, receive: Any, send: Any) -> None:
                scope.setdefault("extensions", {})["tls"] = {"client_cert_cn": common_name}
                await inner(scope, receive, send)

            self.app = app

    return _ClientCertProtocol
