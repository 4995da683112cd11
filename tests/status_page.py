"""Drives headless Chromium through Hyperion's status page, as an operator
would: open it, see only readiness, enter a wrong token, then the right
one, let it refresh a few times, read the figures off the page, and take a
screenshot.

Python's standard library only: Chromium is driven over the DevTools
protocol on a pipe (--remote-debugging-pipe: commands on fd 3, replies on
fd 4, each a JSON message ended by a NUL), so no port is opened and no
WebSocket client is needed.

    status_page.py CHROMIUM ADMIN_URL TOKEN SCREENSHOT.png

Prints one JSON object: what the page showed before the token
(`before`), after a wrong one (`wrong_token_error`), and after the right
one (`after`), every figure as the page's text. Exits non-zero with a
message when the page does not get there within its bounds.
"""

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TIMEOUT_S = 30


class Browser:
    def __init__(self, chromium):
        # Our ends stay above 100; the child's are moved to 3 and 4.
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in
               (to_browser_r, to_browser_w, from_browser_r, from_browser_w)]
        for fd in (to_browser_r, to_browser_w, from_browser_r, from_browser_w):
            os.close(fd)
        child_in, self.w, self.r, child_out = fds
        os.set_inheritable(child_in, True)
        os.set_inheritable(child_out, True)

        def wire():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.profile = tempfile.mkdtemp(prefix="hyperion-chromium-")
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking",
             "--user-data-dir=" + self.profile, "--window-size=1440,1100", "about:blank"],
            preexec_fn=wire, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self.next_id = 0
        self.buffer = b""
        self.session = None

    def send(self, method, params=None, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            while b"\0" not in self.buffer:
                if time.monotonic() > deadline:
                    raise SystemExit("Chromium did not answer " + method)
                chunk = os.read(self.r, 1 << 16)
                if not chunk:
                    raise SystemExit("Chromium went away during " + method)
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise SystemExit(method + ": " + json.dumps(reply["error"]))
                return reply.get("result", {})

    def eval(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise SystemExit("page script failed: " + json.dumps(r["exceptionDetails"]))
        return r["result"].get("value")

    def wait_for(self, expression, what):
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if self.eval(expression):
                return
            time.sleep(0.1)
        raise SystemExit("the page did not get to: " + what)

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except SystemExit:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


# Everything the page shows, as text.
READ = """(() => {
  const t = (id) => document.getElementById(id).textContent.trim();
  const rows = (id) => [...document.getElementById(id).querySelectorAll('tr')]
      .map(tr => [...tr.children].map(td => td.textContent.trim()));
  return {
    ticks: Number(document.body.dataset.ticks || 0),
    login_visible: !document.getElementById('login').hidden,
    figures_visible: !document.getElementById('figures').hidden,
    ready: t('ready'), generation: t('generation'), last_reload: t('last-reload'),
    uptime: t('uptime'), version: t('version'),
    rps: t('rps'), rps_sub: t('rps-sub'), hit_ratio: t('hit-ratio'), hit_sub: t('hit-sub'),
    cache_bytes: t('cache-bytes'), cache_sub: t('cache-sub'),
    cache_bar: document.getElementById('cache-bar').style.width,
    tokens_saved: t('tokens-saved'), seconds_saved: t('seconds-saved'),
    inflight: t('inflight'), queued: t('queued'),
    routes: rows('routes'), upstreams: rows('upstreams'), slowest: rows('slowest'),
    limiters: rows('limiters'), shared: rows('shared'),
    sparklines: [...document.querySelectorAll('svg polyline')].map(p => p.getAttribute('points').split(' ').length),
    cookie: document.cookie,
    url: location.href,
    token_error: t('token-error'),
  };
})()"""


def main():
    chromium, url, token, screenshot = sys.argv[1:5]
    # Refreshes to wait for after the token: a screenshot for the docs
    # wants longer sparklines than a test needs.
    refreshes = int(os.environ.get("STATUS_PAGE_REFRESHES", "4"))
    b = Browser(chromium)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = b.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                    "flatten": True}, session=False)
        b.session = attached["sessionId"]
        b.send("Page.enable")
        b.send("Emulation.setDeviceMetricsOverride",
               {"width": 1440, "height": 1100, "deviceScaleFactor": 1, "mobile": False})
        b.send("Emulation.setEmulatedMedia",
               {"features": [{"name": "prefers-color-scheme", "value": "light"}]})
        b.send("Page.navigate", {"url": url})
        b.wait_for("document.readyState === 'complete' && Number(document.body.dataset.ticks || 0) >= 1",
                   "its first refresh")
        out = {"before": b.eval(READ)}

        def enter(text):
            b.eval("document.getElementById('token').focus()")
            b.send("Input.insertText", {"text": text})
            b.eval("document.querySelector('#token-form button').click()")

        enter("not-the-token")
        b.wait_for("document.getElementById('token-error').textContent.length > 0",
                   "saying the wrong token was refused")
        out["wrong_token_error"] = b.eval(READ)["token_error"]

        enter(token)
        start = b.eval("Number(document.body.dataset.ticks || 0)")
        # Refreshes after the token: rates and sparklines need samples.
        deadline = time.monotonic() + refreshes * 2 + TIMEOUT_S
        while b.eval("Number(document.body.dataset.ticks || 0)") < start + refreshes:
            if time.monotonic() > deadline:
                raise SystemExit("the page did not refresh %d times" % refreshes)
            time.sleep(0.2)
        b.wait_for("!document.getElementById('figures').hidden", "the figures shown")
        out["after"] = b.eval(READ)
        out["token_in_storage"] = b.eval("sessionStorage.length")
        shot = b.send("Page.captureScreenshot", {"format": "png"})
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        # Paused, the page stops asking.
        b.eval("document.getElementById('pause').click()")
        paused_at = b.eval("Number(document.body.dataset.ticks)")
        time.sleep(2.5)
        out["ticks_while_paused"] = b.eval("Number(document.body.dataset.ticks)") - paused_at
        out["pause_label"] = b.eval("document.getElementById('pause').textContent")
    finally:
        b.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
