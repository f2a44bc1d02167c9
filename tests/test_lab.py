"""Smoke test for `make lab`: JupyterLab starts headless and serves the course notebooks."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import NOTEBOOKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str):
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, resp.read()


def test_jupyterlab_serves_the_course(tmp_path: Path):
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={NOTEBOOKS}",
           "--ServerApp.open_browser=False", "--allow-root"]
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        listing = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, "JupyterLab exited early:\n" + (tmp_path / "lab.log").read_text()[-2000:]
            try:
                status, body = _get(f"{base}/api/contents", token)
                listing = json.loads(body)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(0.5)
        assert listing is not None, "JupyterLab did not answer within 90 s:\n" + (tmp_path / "lab.log").read_text()[-2000:]
        served = {item["name"] for item in listing["content"]}
        expected = {p.name for p in NOTEBOOKS.glob("*.ipynb")}
        assert "00_course_map.ipynb" in served
        assert expected <= served, f"not served: {expected - served}"
        status, body = _get(f"{base}/lab", token)
        assert status == 200 and b"JupyterLab" in body
        status, body = _get(f"{base}/api/kernelspecs", token)
        assert "python3" in json.loads(body)["kernelspecs"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
