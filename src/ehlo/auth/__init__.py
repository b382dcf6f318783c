"""SMTP AUTH (RFC 4954) building blocks: the user database and the SASL mechanisms.

This package owns who may authenticate and how their credentials are
exchanged, but not the AUTH command itself (the protocol core drives it):

* :mod:`ehlo.auth.users`: the ``users`` file in the data folder, Argon2id
  password hashes (RFC 9106) of SASLprep-ed passwords (RFC 4013);
* :mod:`ehlo.auth.sasl`: sans-IO server-side PLAIN (RFC 4616) and LOGIN;
* :mod:`ehlo.auth.cli`: the ``ehlo users`` command.
"""

from __future__ import annotations

from .sasl import (
    MECHANISMS,
    Challenge,
    Credentials,
    SaslFailure,
    ServerMechanism,
    decode_response,
    new_mechanism,
)
from .users import UserError, UserStore, UserTable, check_password, hash_password, saslprep

__all__ = [
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "SaslFailure",
    "ServerMechanism",
    "UserError",
    "UserStore",
    "UserTable",
    "check_password",
    "decode_response",
    "hash_password",
    "new_mechanism",
    "saslprep",
]
