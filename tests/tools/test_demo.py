"""`fastgate demo` as a user runs it: a subprocess on loopback, then the requests it prints.

The JSON mode (``--json``) prints the same information as the text mode on one line; the test
runs every request it describes with an aiohttp client and checks the answers it promises,
then the mint and explain commands it prints, and that it stops by itself (``--duration``).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fastgate.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DURATION = 10  # seconds after the demo is ready; the requests below take about 3


def start_demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fastgate", "demo", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"the demo printed nothing within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"the demo exited ({proc.returncode}) without output:\n{err}")
    return line


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """A printed `fastgate ...` command, run as `python -m fastgate ...`."""
    assert args[0] == "fastgate"
    return subprocess.run([sys.executable, "-m", "fastgate", *args[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


async def fetch(session: aiohttp.ClientSession, url: str,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    async with session.get(url, headers=headers or {}) as resp:
        body = await resp.read()
        try:
            doc: Any = json.loads(body)
        except ValueError:
            doc = body.decode()
        return resp.status, dict(resp.headers), doc


async def exercise(info: dict[str, Any]) -> dict[str, tuple[int, dict[str, str], Any]]:
    answers = {}
    async with aiohttp.ClientSession() as session:
        for req in info["requests"]:
            assert req["method"] == "GET"
            answers[req["name"]] = await fetch(session, req["url"], req["headers"])
        answers["metrics"] = await fetch(session, info["metrics_url"])
        answers["readyz"] = await fetch(session, info["readyz_url"])
    return answers


def run_json_demo(proc: subprocess.Popen[str], tmp_path: Path) -> str:
    """Everything the JSON mode promises; returns the demo's stderr (the access log)."""
    info = json.loads(read_line(proc))

    # -- what it says it used ---------------------------------------------------------
    config_path = Path(info["config_path"])
    assert config_path.parent == tmp_path and config_path.is_file()
    config = load_config(config_path, {})
    provider = config.providers["demo-idp"]
    assert provider.key_source == "discovery" and provider.issuer == info["issuer"]
    assert [r.name for r in config.routes] == ["public", "orders", "partner"]
    for url in (info["gateway"], info["issuer"], info["upstream"], info["admin"]):
        assert url.startswith("http://127.0.0.1:")
    key_path = Path(info["key_path"])
    assert key_path.is_file() and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert info["metrics_url"] == info["admin"] + "/metrics"

    # -- the printed curl commands carry the same tokens the JSON gives ------------------
    reqs = {r["name"]: r for r in info["requests"]}
    assert set(reqs) >= {"accepted", "missing_scope", "expired", "partner", "spoofed"}
    for req in info["requests"]:
        argv = shlex.split(req["curl"])
        assert argv[0] == "curl" and argv[-1] == req["url"]
        for name, value in req["headers"].items():
            assert f"{name}: {value}" in argv
    tokens = info["tokens"]
    assert f"Bearer {tokens['accepted']}" in reqs["accepted"]["curl"]
    assert f"Bearer {tokens['missing_scope']}" in reqs["missing_scope"]["curl"]
    assert f"Bearer {tokens['expired']}" in reqs["expired"]["curl"]
    assert f"Bearer {tokens['partner']}" in reqs["partner"]["curl"]
    assert info["api_key"] in reqs["partner"]["curl"]

    # -- run them -------------------------------------------------------------------
    answers = asyncio.run(exercise(info))
    for name, req in reqs.items():
        status, headers, body = answers[name]
        assert status == req["expect_status"], (name, status, body)
        if req["expect_reason"] is not None:
            assert body["reason"] == req["expect_reason"], (name, body)
            assert "upstream" not in body
    status, _, body = answers["accepted"]
    echoed = body["headers"]
    assert body["upstream"] == "echo" and body["path"] == "/api/orders/42"
    assert echoed["X-User-Id"] == "alice"
    assert echoed["X-Tenant"] == "acme"
    assert echoed["X-Roles"] == "reader,writer"
    status, headers, body = answers["missing_scope"]
    assert (status, body["reason"]) == (403, "insufficient_scope")
    assert 'scope="orders:read"' in headers["WWW-Authenticate"]
    status, headers, body = answers["expired"]
    assert (status, body["reason"]) == (401, "token_expired")
    assert 'error_description="token_expired"' in headers["WWW-Authenticate"]
    _, _, body = answers["spoofed"]
    assert body["headers"]["X-User-Id"] == "alice"  # not "mallory"
    assert body["headers"]["X-Tenant"] == "acme"  # not "evil-corp"
    assert "mallory" not in json.dumps(body)
    _, _, body = answers["partner"]
    assert body["headers"]["X-Client-Id"] == "partner-app"
    assert "X-API-Key" not in body["headers"]  # a gateway credential, never forwarded
    assert answers["partner_no_key"][2]["reason"] == "api_key_missing"
    assert answers["public"][0] == 200

    status, _, metrics = answers["metrics"]
    assert status == 200
    assert 'fastgate_rejects_total{reason="token_expired",route="orders"} 1.0' in metrics
    assert 'fastgate_rejects_total{reason="insufficient_scope",route="orders"} 1.0' \
        in metrics
    assert answers["readyz"][0] == 200

    # -- the printed mint command makes a token the gateway accepts ------------------
    minted = cli(*shlex.split(info["mint_command"]))
    assert minted.returncode == 0, minted.stderr
    new = minted.stdout.strip()

    async def with_new_token() -> tuple[int, dict[str, str], Any]:
        async with aiohttp.ClientSession() as session:
            return await fetch(session, info["gateway"] + "/api/orders/1",
                               {"Authorization": f"Bearer {new}"})

    status, _, body = asyncio.run(with_new_token())
    assert status == 200, body
    assert body["headers"]["X-User-Id"] == "bob"
    assert body["headers"]["X-Tenant"] == "globex"

    # -- the printed explain command explains the expired token (via discovery) -------
    explained = cli(*shlex.split(info["explain_command"]))
    assert explained.returncode == 1, explained.stdout + explained.stderr
    assert "401 token_expired" in explained.stdout
    assert "kid=demo-rs256" in explained.stdout

    # -- it stops by itself, cleanly ----------------------------------------------------
    assert proc.wait(timeout=DURATION + 30) == 0
    assert proc.stderr is not None
    return proc.stderr.read()


def test_demo_json_requests_behave_as_printed(tmp_path: Path) -> None:
    with start_demo("--duration", str(DURATION), "--json", "--port", "0",
                    "--dir", str(tmp_path)) as proc:
        try:
            err = run_json_demo(proc, tmp_path)
        finally:
            if proc.poll() is None:
                proc.kill()
    # The access log (stderr): one line per request; rejects never reached the upstream.
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    rejects = [x for x in lines if x["reason"] is not None]
    assert {x["reason"] for x in rejects} == {"insufficient_scope", "token_expired",
                                              "api_key_missing"}
    assert all(x["upstream_latency_s"] is None for x in rejects)
    assert "Traceback" not in err


def test_demo_text_output_and_busy_port_fallback(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with start_demo("--duration", "0.5", "--port", str(port), "--admin-port", "0",
                        "--dir", str(tmp_path)) as proc:
            try:
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert proc.returncode == 0, err
    assert f"port {port} is busy" in out
    gateway = next(line.split()[1] for line in out.splitlines()
                   if line.strip().startswith("gateway "))
    assert gateway.startswith("http://127.0.0.1:") and not gateway.endswith(f":{port}")
    config = str(tmp_path / "gateway.yaml")
    assert config in out and str(tmp_path / "issuer-key.pem") in out
    assert "/metrics" in out
    assert f"fastgate verify -c {config}" in out
    assert f"fastgate token --key {tmp_path / 'issuer-key.pem'}" in out
    # Every $VARIABLE a printed command uses is defined in the block printed above them.
    defined = {line.split("=", 1)[0].strip() for line in out.splitlines()
               if line.startswith("   ") and "=" in line and line.strip()[0].isupper()}
    assert {"TOKEN", "NO_SCOPE_TOKEN", "EXPIRED", "PARTNER_TOKEN", "API_KEY"} <= defined
    curls = [line.strip() for line in out.splitlines() if line.strip().startswith("curl ")]
    assert len(curls) >= 7
    for line in curls:
        for word in line.replace('"', " ").split():
            if word.startswith("$"):
                assert word[1:] in defined, word
    assert "403 insufficient_scope" in out and "401 token_expired" in out
    assert "Stops by itself after 0.5s" in " ".join(out.split())
    assert os.path.exists(config)


# -- the temporary folder (it holds the issuer's private key) and bad arguments ---------------


def _temp_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A demo without --dir, its TMPDIR pointed at ``tmp_path``: its folder is findable."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "fastgate", "demo", "--json", "--port", "0",
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    info = json.loads(read_line(proc))
    return proc, info


def test_demo_removes_its_temporary_folder_after_duration(tmp_path: Path) -> None:
    proc, info = _temp_demo(tmp_path, "--duration", "0.3")
    try:
        workdir = Path(info["workdir"])
        assert workdir.parent == tmp_path and info["workdir_removed_on_stop"] is True
        assert Path(info["key_path"]).parent == workdir
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not workdir.exists(), "the private key was left behind"
    assert list(tmp_path.iterdir()) == []


def test_demo_removes_its_temporary_folder_on_ctrl_c(tmp_path: Path) -> None:
    proc, info = _temp_demo(tmp_path)
    try:
        key = Path(info["key_path"])
        assert key.exists()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not key.parent.exists()


def test_demo_keeps_a_dir_it_was_given(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "fastgate", "demo", "--json", "--port", "0",
                        "--duration", "0.2", "--dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[0])["workdir_removed_on_stop"] is False
    assert (tmp_path / "issuer-key.pem").exists()


def test_demo_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    for args in (["--port", "99999"], ["--port", "-1"], ["--port", "abc"],
                 ["--admin-port", "70000"],
                 ["--duration", "0"], ["--duration", "nan"], ["--duration", "inf"],
                 ["--dir", str(Path(__file__))]):
        p = subprocess.run([sys.executable, "-m", "fastgate", "demo", "--port", "0", *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "TMPDIR": str(tmp_path)})
        assert p.returncode in (1, 2), (args, p.stderr)
        assert "Traceback" not in p.stderr, args
        assert len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert p.stdout == "", args
    assert list(tmp_path.iterdir()) == []  # nothing was started, nothing left behind


def test_demo_tls_serves_https_with_its_own_ca(tmp_path: Path) -> None:
    """`fastgate demo --tls`: the gateway speaks TLS with a certificate from a throw-away CA
    in the demo folder, and every printed curl line carries --cacert: run as printed (the
    real curl), each answers the status it promises; without the CA the handshake fails."""
    import ssl

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    with start_demo("--tls", "--duration", str(DURATION), "--json", "--port", "0",
                    "--dir", str(tmp_path)) as proc:
        try:
            info = json.loads(read_line(proc))
            assert info["gateway"].startswith("https://127.0.0.1:")
            ca = tmp_path / "ca.pem"
            assert ca.is_file()
            assert stat.S_IMODE((tmp_path / "gateway.key").stat().st_mode) == 0o600
            for req in info["requests"]:
                assert req["cacert"] == str(ca)
                argv = shlex.split(req["curl"])
                assert argv[:4] in (["curl", "-s", "--cacert", str(ca)],
                                    ["curl", "-si", "--cacert", str(ca)])
                done = subprocess.run([*argv[:1], "-o", os.devnull, "-w", "%{http_code}",
                                       *argv[1:]], capture_output=True, text=True,
                                      timeout=30)
                assert done.stdout == str(req["expect_status"]), (req["name"], done)

            async def untrusted() -> str:
                ctx = ssl.create_default_context()  # the system store: not the demo CA
                try:
                    async with aiohttp.ClientSession() as session, \
                            session.get(info["gateway"] + "/public/hello", ssl=ctx):
                        return "connected"
                except aiohttp.ClientConnectorCertificateError:
                    return "refused"

            assert asyncio.run(untrusted()) == "refused"
        finally:
            if proc.poll() is None:
                proc.kill()
