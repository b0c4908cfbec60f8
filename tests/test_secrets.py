"""Secrets in SHARDS stay out of everything vaedec prints or writes, and what it writes is readable by others.

A presigned URL's token (`?X-Amz-Signature=…`), a URL's `user:password@` and a `pipe:` command's environment
assignments must not reach a log line, a message, metrics.jsonl, TensorBoard or any file of the run folder or the
export (run folders and exports get shared and pushed to hubs); a resume with a fresh token continues the run. Every
file vaedec writes has the umask's mode (safetensors alone makes 0600 files a ComfyUI of another user cannot read).
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import FAST_TRAIN, cli

from vaedec.io import umask
from vaedec.redact import redact

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TOKEN = "Tok3nSIGsecret"  # a presigned URL's signature
CRED = "AKIAcredSECRET"
PASSWORD = "pa55wordSECRET"
SECRETS = (TOKEN, CRED, PASSWORD)


# ----------------------------------------------------------------------------------------------------------------
# redact


@pytest.mark.parametrize("text, expected", [
    ("https://b.s3.amazonaws.com/sh/{name}?X-Amz-Signature=abc&X-Amz-Credential=AK%2F1",
     "https://b.s3.amazonaws.com/sh/{name}?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("https://acct.blob.core.windows.net/c/?sv=2024&sig=xyz%3D&flag", "https://acct.blob.core.windows.net/c/?sv=***&sig=***&flag"),
    ("http://me:pw@127.0.0.1:8000/shards/ cannot be reached", "http://me:***@127.0.0.1:8000/shards/ cannot be reached"),
    ("pipe:AWS_SECRET_ACCESS_KEY=abc AWS_ID=x aws s3 cp s3://b/{name} -", "pipe:AWS_SECRET_ACCESS_KEY=*** AWS_ID=*** aws s3 cp s3://b/{name} -"),
    ("`pipe:env T=zz curl -s https://h/{name}?s=q` exited with status 3: no", "`pipe:env T=*** curl -s https://h/{name}?s=***` exited with status 3: no"),
    ("pipe:cat /d/{name} | TOKEN=1 tool --key=v A=b", "pipe:cat /d/{name} | TOKEN=*** tool --key=v A=b"),
])
def test_redact_masks_url_passwords_query_values_and_pipe_environment(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected  # the redacted form is stable: resume checks compare redacted forms


@pytest.mark.parametrize("text", [
    "/data/shards with=sign/", "http://127.0.0.1:8000/shards/", "pipe:cat /data/{name}", "me@example.com",
    "run `ACCELERATE_USE_CPU=true accelerate launch cli.py train ...`", "stabilityai/sd-vae-ft-ema",
])
def test_redact_leaves_text_without_secrets_alone(text: str) -> None:
    assert redact(text) == text


# ----------------------------------------------------------------------------------------------------------------
# a signed URL and a password URL, trained from end to end


class _SigningHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; refuses (403) a request whose signature or basic-auth password is not one it accepts."""

    signatures: ClassVar[frozenset[str]] = frozenset()

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization", "")
        password_ok = auth == "Basic " + base64.b64encode(f"me:{PASSWORD}".encode()).decode()
        signed_ok = any(f"X-Amz-Signature={s}" in self.path for s in self.signatures)
        if not (password_ok or signed_ok):
            self.send_error(403, "signature does not match")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def signing_server(folder: Path, signatures: set[str]) -> Iterator[int]:
    handler = type("Handler", (_SigningHandler,), {"signatures": frozenset(signatures)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def files_holding_secrets(*roots: Path) -> list[str]:
    """Every file under `roots` whose bytes contain one of the secrets."""
    found = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    return found


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.slow
def test_a_signed_url_trains_resumes_with_a_fresh_token_and_is_written_nowhere(tmp_path, shards, capfd) -> None:
    run, export, served = tmp_path / "run", tmp_path / "export", tmp_path / "served"
    served.mkdir()
    for name in ("domain", "general"):  # two sets (the --mix one is the general set), named by their folders
        (served / name).symlink_to(shards.resolve())
    with signing_server(served, {TOKEN, TOKEN + "2"}) as port:
        def signed(token: str) -> str:
            return f"http://127.0.0.1:{port}/domain/{{name}}?X-Amz-Signature={token}&X-Amz-Credential={CRED}"

        password_url = f"http://me:{PASSWORD}@127.0.0.1:{port}/general/"
        steps = [*FAST_TRAIN, "data.val_shards=1", "run.checkpoint_every_steps=1", "run.image_every_steps=1",
                 "run.val_every_steps=1", "--mix", f"{password_url}:0.3", "--output", run]
        first = cli("train", signed(TOKEN), *steps, "run.max_steps=2", "--no-export")
        # The signature expired; the user signs the URLs again and reruns: the run resumes.
        second = cli("train", signed(TOKEN + "2"), *steps, "run.max_steps=3")
        assert "resumed from" in second.output and (run / "export" / "config.json").is_file()
        cli("export", run, export, "--format", "both")
        # A shard that cannot be fetched: the message names the URL, not its token.
        refused = cli("inspect", signed("wrong"), code=1)
        assert "403" in refused.output and "X-Amz-Signature=***" in refused.output
        missing = cli("train", f"http://me:{PASSWORD}@127.0.0.1:{port}/nothing/", *steps, code=1)
    logs = first.output + second.output + refused.output + missing.output + "".join(capfd.readouterr())
    assert "X-Amz-Signature=***" in (run / "config.yaml").read_text()  # stored, redacted
    assert "me:***@127.0.0.1" in missing.output  # the message still names the URL
    assert not [s for s in SECRETS if s in logs], logs
    assert files_holding_secrets(run, export) == []


# ----------------------------------------------------------------------------------------------------------------
# file modes


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_file_written_has_the_umask_s_mode(tmp_path, shards, mask) -> None:
    old = os.umask(mask)
    try:
        assert umask() == mask
        run, export = tmp_path / "run", tmp_path / "export"
        cli("train", shards, *FAST_TRAIN, "data.val_shards=1", "run.max_steps=2", "run.checkpoint_every_steps=1",
            "--output", run)
        cli("export", run, export, "--format", "both")
        cli("convert", export / "vae.safetensors", tmp_path / "converted")
    finally:
        os.umask(old)
    written = [p for root in (run, export, tmp_path / "converted") for p in root.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in written) and (export / "vae.safetensors") in written
    wrong = [f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}" for p in written
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~mask]
    assert wrong == []
