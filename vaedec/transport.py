"""Where shards live, and reading the raw samples of one tar from there.

SHARDS is a local folder, file:///abs/folder/, http(s)://host/folder/ (the manifest at <base>/manifest.json,
shards at <base>/<name>) or pipe:CMD with {name} where the file name goes (CMD is run through /bin/sh exactly
as written, as WebDataset's pipe: is, once per file, and its stdout read). Only JSON and tar bytes are read;
nothing is unpickled. What the files hold is vaedec/shards.py; what a run reads of them, and in what order, is
vaedec/stream.py.
"""

from __future__ import annotations

import base64
import http.client
import re
import shlex
import signal
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import webdataset as wds

from vaedec.errors import ShardError, ShardUnreachable

PIPE = "pipe:"
NAME_FIELD = "{name}"
PIPE_EXAMPLES = "'pipe:aws s3 cp s3://bucket/shards/{name} -' or 'pipe:gsutil cat gs://bucket/shards/{name}'"
REMOTE_TIMEOUT_S = 60.0  # an http(s) connect or read that waits longer than this fails (and is named)
# A manifest's file names go into URLs and shell commands: plain file names only, nothing the shell
# interprets.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def is_remote(spec: str | Path) -> bool:
    """True for http(s):// URLs and pipe: commands (read as streams); False for folders and file:// URLs."""
    s = str(spec)
    return s.startswith(PIPE) or s.lower().startswith(("http://", "https://"))


def local_folder(spec: str | Path) -> Path:
    """A local SHARDS as a Path: file:///abs/folder/ becomes /abs/folder, a plain path stays as given."""
    s = str(spec)
    return Path(url2pathname(urlsplit(s).path)) if s.startswith("file://") else Path(spec)


def shard_url(spec: str, name: str) -> str:
    """Where the file `name` of remote SHARDS is: <base>/<name> for a URL (query kept; or {name} filled in),
    CMD with {name} filled in for pipe:CMD."""
    if spec.startswith(PIPE) and (NAME_FIELD not in spec or not spec[len(PIPE):].strip()):
        raise ShardError(
            f"{spec!r}: a pipe: SHARDS must say where the file name goes with {NAME_FIELD}, e.g. "
            f"{PIPE_EXAMPLES}; it is run once for manifest.json and once per shard"
        )
    if not _PLAIN_NAME.fullmatch(name):
        raise ShardError(f"{spec}: the manifest names a file {name!r}; shard names are plain file names "
                         "(shard-000000.tar): re-encode, or fix the manifest")
    if spec.startswith(PIPE):
        return spec.replace(NAME_FIELD, name)
    if NAME_FIELD in spec:
        return spec.replace(NAME_FIELD, quote(name))
    parts = urlsplit(spec)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + quote(name)))


def shard_name(path: str) -> str:
    """The file name of a shard for logs and reports: shard-000003.tar for a path, URL or pipe: command."""
    path = str(path)
    if path.startswith(PIPE):
        names = re.findall(r"[A-Za-z0-9_][\w.-]*?\.tar(?![\w-])", path)  # shard_url put a plain name there
        return names[-1] if names else path
    if is_remote(path):
        return unquote(urlsplit(path).path.rsplit("/", 1)[-1]) or path
    return local_folder(path).name


def shards_spec(path: str) -> str:
    """The SHARDS a shard path, URL or pipe: command belongs to, as the user would write it (for hints)."""
    path, name = str(path), shard_name(path)
    if path.startswith(PIPE):
        return path.replace(name, NAME_FIELD)
    if is_remote(path):
        parts = urlsplit(path)
        return urlunsplit(parts._replace(path=parts.path.rsplit("/", 1)[0] + "/"))
    return str(local_folder(path).parent)


def spec_name(spec: str) -> str:
    """A SHARDS' short name (the key of its logs): its folder's name; for a URL its last path component, for
    pipe: the last path component before {name}."""
    s = str(spec)
    if s.startswith(PIPE):
        before = s[len(PIPE):].split(NAME_FIELD)[0]
        word = before.split()[-1] if before.strip() and not before[-1].isspace() else ""
        return word.rstrip("/").rsplit("/", 1)[-1] or "shards"
    if is_remote(s):
        parts = urlsplit(s.split(NAME_FIELD)[0])
        return unquote(parts.path.rstrip("/").rsplit("/", 1)[-1]) or parts.hostname or "shards"
    return local_folder(s).resolve().name


def _request(url: str) -> urllib.request.Request:
    """A GET of `url`; user:password@ in it is sent as HTTP basic authentication (urllib would take it for
    part of the host name)."""
    parts = urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return urllib.request.Request(
        bare, headers={"Authorization": "Basic " + base64.b64encode(userinfo).decode()}
    )


class _HTTPStream:
    """The body of an http(s) response as a file; a broken connection is remembered for `failure`."""

    def __init__(self, url: str):
        self.url, self._failure, self._read = url, None, 0
        try:
            self._response = urllib.request.urlopen(_request(url), timeout=REMOTE_TIMEOUT_S)  # http(s) only
        except urllib.error.HTTPError as e:
            raise ShardUnreachable(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            raise ShardUnreachable(f"{url} cannot be reached ({getattr(e, 'reason', e)})") from None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._response.read(n if n is not None and n >= 0 else None)
        except (OSError, http.client.HTTPException) as e:
            self._failure = (
                f"{self.url}: the connection broke after {self._read} bytes ({type(e).__name__}: {e})"
            )
            raise OSError(self._failure) from None
        self._read += len(data)
        return data

    def failure(self, finished: bool = False) -> str | None:
        """Why the transfer failed, or None (it did not, so any damage is in the bytes themselves)."""
        return self._failure

    def close(self) -> None:
        self._response.close()

    def __repr__(self) -> str:
        return self.url


def _no_blocked_signals() -> None:
    """In the child, before the command runs: no signal blocked. A DataLoader worker blocks SIGTERM and
    SIGUSR1 (signals.ignore_stop_signals) and a child inherits the mask, so without this a pipe: command would
    outlive its worker when the job is stopped. Only a syscall runs between fork and exec."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class _PipeStream:
    """The stdout of a pipe: command as a file; its stderr goes to a temp file so that a failure can quote
    it."""

    def __init__(self, url: str):
        self.url, self.cmd, self._eof = url, url[len(PIPE) :], False
        # stderr to a file, not a pipe: a chatty command cannot block on it. Closed in close().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:  # through the shell, as WebDataset's pipe: does: the command runs exactly as the user wrote it
            self._proc = subprocess.Popen(
                self.cmd,
                shell=True,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                preexec_fn=_no_blocked_signals,  # noqa: PLW1509 - one syscall (the mask) before exec
            )
        except OSError as e:
            self._stderr.close()
            raise ShardUnreachable(f"`{self.url}` cannot be started ({e})") from None

    def read(self, n: int = -1) -> bytes:
        data = self._proc.stdout.read(n)
        if n is None or n < 0 or len(data) < n:  # a buffered pipe returns short only at its end
            self._eof = True
        return data

    def failure(self, finished: bool = False) -> str | None:
        """The command's exit status and the tail of its stderr when it failed, or None. `finished`: the tar
        was read to its end (the rest, padding, is drained first); otherwise a command still sending data has
        not failed and the damage is in its bytes."""
        if finished:
            while self.read(1 << 16):
                pass
        if not self._eof:
            return None
        try:
            status = self._proc.wait(timeout=REMOTE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{self.url}` closed its output but did not exit within {REMOTE_TIMEOUT_S:g} s"
        if status == 0:
            return None
        self._stderr.seek(0)
        lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        said = "; ".join(lines[-3:])[-400:]
        return f"`{self.url}` exited with status {status}" + (
            f": {said}" if said else " (it printed nothing)"
        )

    def close(self) -> None:
        self._proc.stdout.close()  # a command still writing gets SIGPIPE
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.close()

    def __repr__(self) -> str:
        return self.url


def open_remote(url: str) -> _HTTPStream | _PipeStream:
    """A read stream of one remote file (a URL, or a pipe: command with the name filled in)."""
    return _PipeStream(url) if url.startswith(PIPE) else _HTTPStream(url)


def read_remote_bytes(spec: str, name: str) -> bytes:
    """The whole file `name` of remote SHARDS (the manifest); a ShardUnreachable names the URL or command and
    says why (HTTP status, connection, exit status and stderr)."""
    stream = open_remote(shard_url(spec, name))
    try:
        try:
            data = stream.read()
        except OSError:
            data = b""
        failure = stream.failure(finished=True)
    finally:
        stream.close()
    if failure:
        raise ShardUnreachable(failure)
    return data


# ------------------------------------------------------------------------------------------------------------
# the raw samples of one tar


def iter_samples(path: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar (members as bytes), in file order, from a path, URL or pipe: command; a damaged
    tar is a ShardError naming it, a remote one that cannot be fetched a ShardUnreachable."""
    if is_remote(path):
        yield from _remote_samples(path)
        return
    try:
        yield from wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(_damaged(path, e)) from None


def _damaged(path: str, e: BaseException) -> str:
    spec = shards_spec(path)
    return (
        f"{path} cannot be read ({type(e).__name__}: {e}): the shard is damaged. "
        f"`vaedec inspect {shlex.quote(spec) if is_remote(spec) else spec} --verify` lists every problem; "
        "re-encode with --overwrite to rebuild" + (" and upload again." if is_remote(spec) else ".")
    )


def _remote_samples(url: str) -> Iterator[dict[str, Any]]:
    """iter_samples for a URL or pipe: command: WebDataset's tar expansion over our own stream, so that a
    failed transfer is told apart from damaged bytes (WebDataset's gopen would shell out to curl for http)."""
    stream = open_remote(url)
    try:
        try:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
            yield from wds.tariterators.group_by_keys(files)
        except (tarfile.TarError, OSError, EOFError) as e:
            failure = stream.failure()
            raise (ShardUnreachable(failure) if failure else ShardError(_damaged(url, e))) from None
        failure = stream.failure(finished=True)
        if failure:
            raise ShardUnreachable(failure)
    finally:
        stream.close()
