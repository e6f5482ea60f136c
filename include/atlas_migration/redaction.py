"""Keeps credentials out of logs, XCom, reports and exception text.

Airflow's secrets masker already hides connection passwords in task logs; this module covers the text we
build ourselves (error messages from drivers and tools, URIs we print) before it leaves the process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>mongodb(?:\+srv)?://)(?P<user>[^:@/\s]*)(?::[^@/\s]*)?@", re.IGNORECASE)
_SECRET_KV = re.compile(
    r"(?P<key>(?:password|passwd|pwd|secret|token|apikey|api_key|privatekey|private_key|aws_secret_access_key)"
    r"[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s\"',;&}]+)",
    re.IGNORECASE,
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove every given secret (raw and URL-encoded) and any password embedded in a MongoDB URI."""
    out = str(text)
    for secret in secrets:
        if not secret or len(secret) < 3:
            continue
        for form in {secret, quote_plus(secret), quote(secret, safe="")}:
            out = out.replace(form, MASK)
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", out)
    return _SECRET_KV.sub(lambda m: f"{m.group('key')}{MASK}", out)
