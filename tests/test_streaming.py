"""Shards streamed instead of read from a folder: http(s) URLs (a real HTTP server on 127.0.0.1), file:// and
pipe:CMD specs. Training from them equals training from the folder, bit for bit; resume, inspect --verify and
bad-sample reports work; a shard or manifest that cannot be fetched is a one-line error naming URL or
command."""

from __future__ import annotations

import functools
import http.server
import json
import shlex
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import FAST_TRAIN, assert_same_tensors, cli
from safetensors.torch import load_file

from vaedec.errors import ShardError, ShardUnreachable
from vaedec.shards import read_manifest, read_samples, shard_paths
from vaedec.stream import TrainStream
from vaedec.transport import shard_name, shard_url, shards_spec, spec_name

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

STEPS = ["run.max_steps=2", "data.val_shards=1", "run.checkpoint_every_steps=1", "--no-export"]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch) -> None:
    """urllib honours *_proxy variables; the test server is local."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    timeout = 10  # seconds a connection may idle before the server drops it

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """`folder` over HTTP on 127.0.0.1 (a free port) in a daemon thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def url(shards) -> Iterator[str]:
    with serve(shards) as base:
        yield base


def pipe(folder: Path) -> str:
    return f"pipe:cat {folder.resolve()}/{{name}}"


def checkpoint(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    (ckpt,) = run.glob(f"checkpoints/step-*{step}")
    return {p.stem: load_file(str(p)) for p in sorted(ckpt.glob("*.safetensors"))}


def assert_same_checkpoint(a: Path, b: Path, step: int) -> None:
    ca, cb = checkpoint(a, step), checkpoint(b, step)
    assert ca.keys() == cb.keys() and ca
    for name in ca:
        assert_same_tensors(ca[name], cb[name], name)


def one_line_error(result) -> str:
    """The CLI's error: exit code 1, one 'Error:' line, no traceback."""
    assert result.exit_code == 1, result.output
    # after tqdm
    errors = [line[line.index("Error:") :] for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# ------------------------------------------------------------------------------------------------------------
# the specs


def test_spec_names_urls_and_shard_names() -> None:
    s3 = "pipe:aws s3 cp s3://bucket/photos/{name} -"
    assert spec_name(s3) == "photos" and spec_name("pipe:gsutil cat gs://b/general/{name}") == "general"
    assert (
        spec_name("https://host/data/coco/") == "coco" and spec_name("http://127.0.0.1:8000/") == "127.0.0.1"
    )
    assert spec_name("file:///data/coco/") == "coco"
    url = shard_url(s3, "shard-000003.tar")
    assert url == "pipe:aws s3 cp s3://bucket/photos/shard-000003.tar -"
    assert shard_name(url) == "shard-000003.tar" and shards_spec(url) == s3
    signed = shard_url("https://host/shards/?sig=abc", "shard-000003.tar")
    assert (
        signed == "https://host/shards/shard-000003.tar?sig=abc" and shard_name(signed) == "shard-000003.tar"
    )
    assert shard_url("https://acct.blob/c/{name}?sv=1", "manifest.json") == "https://acct.blob/c/manifest.json?sv=1"


def test_pipe_without_name_bucket_urls_and_names_the_shell_would_read_are_refused(tmp_path, shards) -> None:
    msg = one_line_error(cli("inspect", f"pipe:cat {shards}/manifest.json", code=None))
    assert "{name}" in msg and "pipe:aws s3 cp" in msg
    msg = one_line_error(
        cli("train", "pipe:gsutil cat gs://b/shards/", *FAST_TRAIN, "--output", tmp_path / "r", code=None)
    )
    assert "{name}" in msg
    msg = one_line_error(cli("inspect", "s3://bucket/shards/", code=None))
    assert "s3:// is not read directly" in msg and "pipe:aws s3 cp s3://bucket/shards/{name} -" in msg
    # A manifest (fetched from anywhere) names the files; its names go into a shell command, so only plain
    # names.
    folder = tmp_path / "edited"
    shutil.copytree(shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["name"] = f"x; touch {tmp_path}/pwned"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="plain file names"):
        shard_paths(pipe(folder), read_manifest(pipe(folder)))
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------------------
# reading and training


def test_url_pipe_and_file_specs_read_the_folder_s_samples(shards, url) -> None:
    local = [s["key"] for s in read_samples(shard_paths(shards, read_manifest(shards)))]
    for spec in (url, pipe(shards), shards.resolve().as_uri() + "/"):
        assert read_manifest(spec) == read_manifest(shards)
        assert [s["key"] for s in read_samples(shard_paths(spec, read_manifest(spec)))] == local, spec
    r = cli("inspect", url, "--verify")
    assert f"shards         {url}" in r.output and "every sample read back" in r.output
    cli("inspect", pipe(shards), "--verify")


def test_training_from_a_url_or_pipe_equals_training_from_the_folder(tmp_path, shards) -> None:
    """Same config, same weights bit for bit. The URL run stops after step 1 and is resumed: the run folder
    records data.shards as the URL string, and the resume compares it."""
    cli("train", shards, "--output", tmp_path / "local", *FAST_TRAIN, *STEPS)
    with serve(shards) as url:  # its own server, stopped before the DataLoader below forks a worker
        cli("train", url, "--output", tmp_path / "url", *FAST_TRAIN, *STEPS[1:], "run.max_steps=1")
        resumed = cli("train", url, "--output", tmp_path / "url", *FAST_TRAIN, *STEPS)
    assert "(step 2)" in resumed.output
    assert "resumed from" in (tmp_path / "url" / "log.txt").read_text()
    # data.num_workers=1: the pipe: commands run in a DataLoader worker process, each opening its own streams.
    # (A fork while the server's threads run could inherit a lock one of them holds.)
    cli("train", pipe(shards), "--output", tmp_path / "pipe", *FAST_TRAIN, *STEPS, "data.num_workers=1")
    assert_same_checkpoint(tmp_path / "local", tmp_path / "url", 2)
    assert_same_checkpoint(tmp_path / "local", tmp_path / "pipe", 2)


def test_damaged_remote_shard_is_reported_by_its_file_name(tmp_path, shards) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(shards, folder)
    tar = folder / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1536])  # the first member's header and part of its data
    with serve(folder) as base:
        for spec in (base, pipe(folder)):
            stream = TrainStream(shard_paths(spec, read_manifest(spec)), 2, seed=0, shuffle_buffer=0,
                                 on_bad_sample="skip")
            reports = [r for b, _ in zip(stream, range(12)) for r in b["bad_samples"]]
            assert reports and {r["shard"] for r in reports} == {"shard-000001.tar"}, spec
            with pytest.raises(ShardError) as e:
                list(read_samples(shard_paths(spec, read_manifest(spec))))
            # The hint names the SHARDS the user gave, quoted for a shell.
            assert "damaged" in str(e.value) and f"vaedec inspect {shlex.quote(spec)} --verify" in str(
                e.value
            )


# ------------------------------------------------------------------------------------------------------------
# what cannot be fetched


def test_missing_shard_is_a_one_line_error_naming_url_or_command(tmp_path, shards) -> None:
    """Not a skipped bad sample: a shard that cannot be fetched stops the run, as a missing local shard
    does."""
    folder = tmp_path / "gone"
    shutil.copytree(shards, folder)
    (folder / "shard-000000.tar").unlink()
    with serve(folder) as base:
        msg = one_line_error(cli("train", base, "--output", tmp_path / "url", *FAST_TRAIN, *STEPS, code=None))
        assert f"{base}shard-000000.tar: HTTP 404" in msg, msg
    msg = one_line_error(
        cli("train", pipe(folder), "--output", tmp_path / "pipe", *FAST_TRAIN, *STEPS, code=None)
    )
    assert (
        f"`pipe:cat {folder.resolve()}/shard-000000.tar` exited with status 1" in msg
        and "No such file" in msg
    ), msg
    with pytest.raises(ShardUnreachable):
        list(read_samples(shard_paths(pipe(folder), read_manifest(pipe(folder))), skip_bad=True))


def test_unreachable_manifest_is_a_one_line_error(tmp_path, url) -> None:
    msg = one_line_error(cli("inspect", url + "nothing/", code=None))
    assert f"{url}nothing/manifest.json: HTTP 404" in msg
    msg = one_line_error(cli("inspect", "http://127.0.0.1:1/", code=None))  # nothing listens on port 1
    assert "http://127.0.0.1:1/manifest.json cannot be reached" in msg
    msg = one_line_error(cli("inspect", "pipe:sh -c 'echo no such bucket >&2; exit 3' {name}", code=None))
    assert "exited with status 3: no such bucket" in msg
    msg = one_line_error(
        cli("eval", url + "nothing/", "--vae", tmp_path, "--out", tmp_path / "eval", code=None)
    )
    assert "HTTP 404" in msg


def test_a_stuck_read_stops_the_run_after_read_timeout_s(tmp_path, shards) -> None:
    """A pipe: command that serves each shard once (the grid's read in the main process) and then hangs: the
    DataLoader worker's read times out after data.read_timeout_s, and the run stops with a message instead of
    waiting for ever."""
    seen = tmp_path / "seen"
    seen.mkdir()
    hang = (f"pipe:if [ -e {seen}/{{name}} ]; then sleep 20; else touch {seen}/{{name}}; "
            f"cat {shards.resolve()}/{{name}}; fi")
    r = cli("train", hang, "--output", tmp_path / "run", *FAST_TRAIN, "run.max_steps=2", "--no-export",
            "data.num_workers=1", "data.read_timeout_s=2", code=None)
    msg = one_line_error(r)
    assert "no batch from the data loader in 2 s" in msg and "rerun the same command to resume" in msg, msg


def test_a_pipe_command_started_with_stop_signals_blocked_does_not_inherit_the_block(monkeypatch) -> None:
    """A DataLoader worker blocks SIGTERM/SIGUSR1 (signals.ignore_stop_signals); its pipe: commands must still
    end on them, with the rest of the job. Debian's dash clears the mask itself, bash (/bin/sh on RHEL-family
    clusters) keeps it: the command runs under bash here, as it would there."""
    import functools
    import shutil
    import signal
    import subprocess

    from vaedec import transport

    if shutil.which("bash") is None:
        pytest.skip("no bash on this machine")
    monkeypatch.setattr(transport.subprocess, "Popen", functools.partial(subprocess.Popen, executable="bash"))
    stop = {signal.SIGTERM, signal.SIGUSR1}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        stream = transport.open_remote("pipe:grep SigBlk /proc/self/status")
        try:
            blocked = int(stream.read().decode().split()[-1], 16)
        finally:
            stream.close()
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the caller's block is kept
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert blocked & (1 << (signal.SIGTERM - 1)) == 0 and blocked & (1 << (signal.SIGUSR1 - 1)) == 0, hex(
        blocked
    )
