"""`sparsecomm keys DIR NAME [NAME ...]`: CURVE key pairs for the coordinator and its clients.

Writes DIR/NAME.key (public; give it to the other side) and DIR/NAME.key_secret (keep it).
The coordinator takes its .key_secret with --curve-secret-key and a directory holding the
allowed clients' .key files with --allow-keys; a client needs its own .key_secret and the
server's .key. A client whose public key is not in the allow-list cannot complete the
handshake, so it cannot send a single message. The name is the identity: a client holding
NAME.key_secret may only act as worker NAME (name trainer keys after their worker ids).

    sparsecomm keys certs server trainer-0 trainer-1
    mkdir allowed && cp certs/trainer-*.key allowed/
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="output directory")
    p.add_argument("names", nargs="+", help="one key pair per name (e.g. server trainer-0)")


def run(args: argparse.Namespace) -> int:
    import zmq.auth

    args.dir.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        public, secret = zmq.auth.create_certificates(str(args.dir), name)
        os.chmod(secret, 0o600)
        print(f"{name}: public {public}, secret {secret}")
    return 0
