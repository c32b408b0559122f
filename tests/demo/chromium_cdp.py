"""Headless Chromium driven over the DevTools protocol on a pipe (no extra dependency).

``load(path)`` opens a local page, waits for its load event, and returns the console errors,
uncaught exceptions and failed resource loads, with a full-page PNG screenshot. Chromium's
``--enable-logging`` output does not tell console.error from console.log, hence the protocol.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--remote-debugging-pipe"]


def executable() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    """The DevTools protocol over fds 3 (to the browser) and 4 (from it): NUL-terminated JSON."""

    def __init__(self, write_fd: int, read_fd: int):
        self.w, self.r, self.buf, self.next_id, self.events = write_fd, read_fd, b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=60.0):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout=60.0) -> dict:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while time.monotonic() < deadline:
            e = self._read()
            self.events.append(e)
            if e.get("method") == method:
                return e
        raise TimeoutError(method)

    def _read(self) -> dict:
        while b"\0" not in self.buf:
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed the DevTools pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)


def load(path, screenshot_path, width: int = 1200) -> list[str]:
    """Problems found while loading ``path`` (empty: none); writes a full-page screenshot."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()

    def wire():  # in the child: fd 3 reads commands, fd 4 writes replies
        a, b = os.dup(to_r), os.dup(from_w)  # out of the way first: to_r or from_w may be 3 or 4
        os.dup2(a, 3)
        os.dup2(b, 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([executable(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        cdp = _Pipe(to_w, from_r)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                cdp.send(f"{domain}.enable", session=s)
            cdp.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=s)
            cdp.send("Page.navigate", {"url": f"file://{os.path.abspath(path)}"}, session=s)
            cdp.wait_for("Page.loadEventFired")
            shot = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                            session=s)
            with open(screenshot_path, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            problems = []
            for e in cdp.events:
                m, p = e.get("method"), e.get("params", {})
                if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    problems.append("console.error: " + " ".join(str(a.get("value")) for a in p["args"]))
                elif m == "Runtime.exceptionThrown":
                    problems.append("exception: " + p["exceptionDetails"].get("text", ""))
                elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                    problems.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
            try:
                cdp.send("Browser.close", timeout=10)
            except (EOFError, TimeoutError, RuntimeError):
                pass
            return problems
        finally:
            os.close(to_w)
            os.close(from_r)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
