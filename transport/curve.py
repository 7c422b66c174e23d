"""CURVE keys for ZeroMQ authentication and encryption (CurveZMQ), and the rule for when they are required.
The command line is ``python -m transport.keys`` (transport/keys.py).

Binds default to loopback. Any other bind address needs CURVE (``transport.curve_keys_dir``) unless
``transport.insecure=true`` says otherwise (a warning is logged). Generate a key folder once and give every
machine of the job a copy (stand-alone workers need only ``server.key`` and their own pair)::

    python -m transport.keys runs/keys                  # server + one client pair, the client authorized
    python -m transport.keys runs/keys --client node7   # one more client pair, also authorized

Layout (ZeroMQ's certificate format, ``zmq.auth.create_certificates``)::

    server.key, server.key_secret    the coordinator's pair; actors need only the public ``server.key``
    client.key, client.key_secret    the default actor pair (transport.curve_client=client)
    authorized/<name>.key            public keys the coordinator accepts; delete one to revoke that client

A client whose public key is not in ``authorized/`` fails the handshake: the coordinator never sees a frame of
it, and counts ``auth_failed``. Secret files are written mode 0600.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE settings. ``server_public`` is the coordinator's public key (a client connects to it;
    for the server it is its own). ``authorized_dir``: server only, the folder of accepted client keys."""

    public: bytes
    secret: bytes
    server_public: bytes
    authorized_dir: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard ("*"): not loopback


def server_keys(keys_dir: str | Path) -> CurveKeys:
    d = Path(keys_dir)
    public, secret = _load(d / "server.key_secret")
    return CurveKeys(public=public, secret=secret, server_public=public, authorized_dir=str(d / "authorized"))


def client_keys(keys_dir: str | Path, name: str = "client") -> CurveKeys:
    d = Path(keys_dir)
    public, secret = _load(d / f"{name}.key_secret")
    server_public, _ = _load(d / "server.key")
    return CurveKeys(public=public, secret=secret, server_public=server_public)


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise FileNotFoundError(f"no CURVE key file {path}; generate keys with `python -m transport.keys "
                                f"{path.parent}` and copy the folder to every machine of the job")
    return zmq.auth.load_certificate(str(path))


def generate(keys_dir: str | Path, clients: tuple[str, ...] = ("client",)) -> None:
    """Create the server pair (once) and the named client pairs; authorize every client."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support (libsodium); install pyzmq's wheel")
    d = Path(keys_dir)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    names = ([] if (d / "server.key_secret").exists() else ["server"]) + list(clients)
    for name in names:
        public, secret = zmq.auth.create_certificates(str(d), name)
        Path(secret).chmod(0o600)
        if name != "server":
            shutil.copyfile(public, d / "authorized" / f"{name}.key")
