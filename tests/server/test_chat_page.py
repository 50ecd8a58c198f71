"""The chat page at /: served from the package, and, in headless Chromium, a message sent, a streamed
answer shown token by token, the alternatives shown on hover; a screenshot for the README."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from server.conftest import API_KEY

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")


def test_page_is_served_without_the_key_and_loads_nothing_from_outside(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "top_logprobs" in r.text
    assert not re.search(r"""(src|href)=["']https?://""", r.text)  # no CDN


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (apt-get install -y chromium); "
                    ".ci/run installs it")
def test_chat_in_headless_chromium(server, tmp_path):
    url = f"{server.url}/#key={API_KEY}&max_tokens=16&system=You%20tell%20stories.&send=Tell%20me%20a%20story"
    for _ in range(5):  # the DOM is dumped once virtual time runs out, however far the stream got: retry
        out = chromium(["--dump-dom", url], tmp_path)
        dom = out.stdout
        if 'data-ready="1"' in dom:
            break
    assert 'data-ready="1"' in dom, out.stderr[-2000:]
    assert 'class="msg user"' in dom and "Tell me a story" in dom
    answer = dom.split('class="msg assistant"', 1)[1]
    assert answer.count('class="tok"') >= 2  # streamed tokens, each its own coloured span
    assert 'class="alts"' in dom and "%</td>" in dom  # the hovered token's alternatives
    # The README's screenshot: NABLA_SCREENSHOTS=docs python -m pytest tests/server/test_chat_page.py
    # (a plain run writes nothing into the repository).
    shot = Path(os.environ.get("NABLA_SCREENSHOTS") or tmp_path) / "chat-page.png"
    for _ in range(5):
        chromium([f"--screenshot={shot}", "--window-size=1100,560", url], tmp_path)
        if shot.exists() and shot.stat().st_size > 10_000:
            break
    assert shot.exists() and shot.stat().st_size > 10_000
