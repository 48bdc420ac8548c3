"""Command-line options every client command shares: how to trust an HTTPS coordinator and
which tokens to present. One place, so that ``device``, ``fleet``, ``status`` and ``task``
spell them alike."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fedge.cli import CommandError


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-file", default=None,
                        help="PEM CA bundle to trust for an https coordinator "
                        "(default: $FEDGE_CA_FILE, else the system's CAs)")
    parser.add_argument("--pin-sha256", default=None,
                        help="the coordinator's public-key pin, as `fedge serve` prints it "
                        "(default: $FEDGE_PIN_SHA256)")


def tls_config(args: argparse.Namespace) -> Any:
    """The :class:`~edge_sdk.tls.TlsConfig` the options (or environment) ask for."""
    from edge_sdk.tls import TlsConfig

    try:
        return TlsConfig(ca_file=args.ca_file or os.environ.get("FEDGE_CA_FILE"),
                         pin_sha256=args.pin_sha256 or os.environ.get("FEDGE_PIN_SHA256"))
    except ValueError as e:
        raise CommandError(str(e)) from e


def add_enrollment_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enrollment-token", default=None,
                        help="sent when the device registers (default: $FEDGE_ENROLLMENT_TOKEN)")


def enrollment_token(args: argparse.Namespace) -> str | None:
    return args.enrollment_token or os.environ.get("FEDGE_ENROLLMENT_TOKEN")


def admin_token(args: argparse.Namespace, *, required: bool = True) -> str | None:
    token = args.admin_token or os.environ.get("FEDGE_ADMIN_TOKEN")
    if required and not token:
        raise CommandError("needs the admin token: --admin-token or $FEDGE_ADMIN_TOKEN")
    return token


@contextmanager
def answered(coordinator: str) -> Iterator[None]:
    """The failures of calls to ``coordinator`` as one-line command errors: its own answer (a
    wrong token, no such task) as it said it, anything else as out of reach."""
    from edge_sdk.errors import ApiError, ClientError

    try:
        yield
    except ApiError as e:
        raise CommandError(str(e)) from e
    except (ClientError, ValueError) as e:
        raise CommandError(f"cannot reach {coordinator}: {e}") from e
