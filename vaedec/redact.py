"""Secrets kept out of everything vaedec shows or writes: the one `redact` every message, log line and stored config
goes through.

SHARDS may be a presigned URL (S3 `X-Amz-Signature=…`, GCS `X-Goog-Signature=…`, Azure SAS `sig=…`), a URL with
`user:password@`, or a `pipe:` command that sets credentials in environment assignments
(`pipe:AWS_SECRET_ACCESS_KEY=… aws s3 cp …`). Run folders, exports and logs get shared and pushed to hubs, so
none of them may hold such a value. What is redacted, without guessing which names are secret:
- in a URL: the password of its user info, and the value of every query parameter (the names stay, so a
  message still says which URL it was and a resumed run compares like with like);
- in a `pipe:` command: the value of each environment assignment (`NAME=value` words where the shell reads them
  as such: before the command name, or after `env`).
The redacted text is for people and for comparisons; it is never run or fetched.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
PIPE = "pipe:"

# A URL inside any text: scheme://, then up to the next white space or quote.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"`<>]+")
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)")
_COMMAND_BREAKS = (";", "&&", "||", "|", "&", "(", "{", "then", "do", "else")


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:  # a malformed URL: keep nothing after the scheme that could be a secret
        return url.split("://", 1)[0] + "://" + MASK
    if "@" in netloc:  # user:password@host -> user:***@host (a lone user name is not a secret)
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}{':' + MASK if sep else ''}@{host}"
    query = "&".join(
        f"{name}={MASK}" if sep else name
        for name, sep, _ in (field.partition("=") for field in parts.query.split("&") if field)
    ) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _redact_pipe(command: str) -> str:
    """Environment assignments of a shell command line, values masked: `A=x B=y cmd --k=v` -> `A=*** B=*** cmd
    --k=v` (only words in command-name position are assignments to the shell)."""
    out, at_command = [], True
    for word in re.split(r"(\s+)", command):
        if not word or word.isspace():
            out.append(word)
            continue
        m = _ASSIGNMENT.fullmatch(word)
        if at_command and m:
            out.append(f"{m.group(1)}={MASK}")
            continue
        out.append(word)
        # The next word names a command again after a separator or `env`; after a command name it does not.
        at_command = word in _COMMAND_BREAKS or word.endswith((";", "|", "&")) or word == "env"
    return "".join(out)


def redact(text: str) -> str:
    """`text` with URL passwords, URL query values and a `pipe:` command's environment assignments masked. A
    `pipe:` command runs to the end of the text or to a closing backquote (messages quote it `pipe:CMD`)."""
    if not isinstance(text, str) or ("://" not in text and PIPE not in text):
        return text
    text = _URL.sub(lambda m: _redact_url(m.group(0)), text)
    return re.sub(re.escape(PIPE) + r"([^`]*)", lambda m: PIPE + _redact_pipe(m.group(1)), text)


def redact_tree(obj: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, tuples, scalars) with every string `redact`ed."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return obj
