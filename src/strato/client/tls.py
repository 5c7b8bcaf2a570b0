"""TLS towards a control plane that has a certificate (``STRATO_TLS_CERT`` on its side).

Clients and worker agents always verify it: against ``STRATO_TLS_CA`` (a PEM bundle;
``strato worker start --tls-ca``) where set, else the system's trust store, with the
host name checked. There is no switch to turn verification off; a certificate that does
not verify is an error that says what to set.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from strato import exceptions as exc
from strato import settings


def client_context(ca: str | Path | None = None) -> ssl.SSLContext:
    """A verifying context: the CA bundle ``ca`` (default ``STRATO_TLS_CA``), else the
    system's trust store."""
    ca = ca or settings.TLS_CA.get()
    try:
        return ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as e:
        raise exc.InvalidError(f"cannot read the CA bundle {ca} (STRATO_TLS_CA): {e}") from None


def verify_failed(
    url: str, e: ssl.SSLCertVerificationError, given: bool = False
) -> exc.ConnectionError:
    """``given``: the client was handed its context (an agent's ``--tls-ca``)."""
    where = settings.TLS_CA.get()
    trusted = f"the CA bundle {where} (STRATO_TLS_CA)" if where else "the system's trust store"
    if given:
        trusted = "the CA bundle it was given (--tls-ca or STRATO_TLS_CA)"
    return exc.ConnectionError(
        f"the control plane at {url} presented a certificate that does not verify against "
        f"{trusted}: {e.verify_message or e.reason}; set STRATO_TLS_CA (or --tls-ca) to the "
        "PEM bundle of the CA that signed its certificate (STRATO_TLS_CERT on its side)"
    )


def not_tls(url: str, e: ssl.SSLError) -> exc.ConnectionError:
    return exc.ConnectionError(
        f"the control plane at {url} does not speak TLS ({e.reason or e}): use an http:// "
        "URL, or give it a certificate (STRATO_TLS_CERT and STRATO_TLS_KEY)"
    )


def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` answers a TLS handshake (to tell a client that dialled plain
    HTTP why its connection was closed). Only a probe: nothing is sent over it, and the
    certificate is not looked at."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with probe.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ssl.SSLError):
        return False


def plain_http_to_tls(url: str) -> exc.ConnectionError:
    return exc.ConnectionError(
        f"the control plane at {url} speaks HTTPS (it has a certificate) and closed this "
        f"plain HTTP connection: use {url.replace('http://', 'https://', 1)} (and "
        "STRATO_TLS_CA where its certificate is not signed by a CA of the system's store)"
    )
