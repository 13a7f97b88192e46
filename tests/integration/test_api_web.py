"""The web client in a real headless browser (Debian chromium, chromium-driver,
python3-selenium): log in with a token, open a room, read history and page
back, send with Enter, see a message from another backend arrive live,
reload and see the history, and markup in a message shown as text with no
script run."""
import os
import shutil
import sys
import tempfile
import unittest

from api_util import Api
from harness import wait_for

DEBIAN_PY = "/usr/lib/python3/dist-packages"
try:
    import selenium  # noqa: F401
except ImportError:
    # A Python other than Debian's (pyenv, a venv) runs the tests: selenium is
    # Debian's python3-selenium, pure Python, so its folder can be borrowed.
    if os.path.isdir(os.path.join(DEBIAN_PY, "selenium")):
        sys.path.append(DEBIAN_PY)
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # pragma: no cover - reported as a skip below
    webdriver = None

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
XSS = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>'


@unittest.skipUnless(webdriver and os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM),
                     "needs Debian's chromium, chromium-driver and python3-selenium (build.sh deps)")
class WebClient(unittest.TestCase):
    def browser(self):
        profile = tempfile.mkdtemp(prefix="segue-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--user-data-dir=" + profile, "--window-size=1200,800"):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.addCleanup(driver.quit)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        return driver

    def texts(self, d):
        return [e.text for e in d.find_elements(By.CSS_SELECTOR, "#messages [data-message-id] .body")]

    def until(self, pred, what, timeout=20):
        self.assertTrue(wait_for(pred, timeout), what)

    def test_log_in_read_send_live_reload_and_no_xss(self):
        api = Api(self)
        watcher = api.user_add("watcher")  # reads as someone else: the admin's unread stays
        room = api.room_id("a", "#general")
        api.room_id("b", "#general")
        for i in range(60):
            api.say("a", "#general", "alice", "old %d" % i)
        self.until(lambda: len(api.get(api.messages_path("a", room, limit=100), watcher)[2]["messages"]) == 60,
                   "the history was not logged")
        d = self.browser()
        d.get("http://127.0.0.1:%d/" % api.port)
        d.find_element(By.ID, "token").send_keys(api.admin)
        d.find_element(By.ID, "login-button").click()
        sel = '[data-room="a/%s"]' % room
        self.until(lambda: d.find_elements(By.CSS_SELECTOR, sel), "the room list never showed a/" + room)
        # rooms are grouped by backend, with unread counts
        self.assertTrue(d.find_elements(By.CSS_SELECTOR, '[data-backend="b"] [data-room^="b/"]'))
        self.assertEqual(d.find_element(By.CSS_SELECTOR, sel + " .unread").text, "60")
        d.find_element(By.CSS_SELECTOR, sel).click()
        self.until(lambda: len(self.texts(d)) == 50, "the newest page of history did not show")
        self.assertEqual(self.texts(d)[-1], "old 59")
        # scrolling to the top pages back
        d.execute_script("const m = document.getElementById('messages'); m.scrollTop = 0;"
                         "m.dispatchEvent(new Event('scroll'));")
        self.until(lambda: len(self.texts(d)) == 60, "scrolling up did not load older messages")
        self.assertEqual(self.texts(d)[0], "old 0")
        # Enter sends
        compose = d.find_element(By.ID, "compose")
        compose.send_keys("hello from the browser", Keys.ENTER)
        self.until(lambda: "hello from the browser" in self.texts(d), "the sent message never showed")
        self.until(lambda: any(m["content"]["value"] == "hello from the browser"
                               for m in api.get(api.messages_path("a", room), watcher)[2]["messages"]
                               if m["content"]["type"] == "Text"), "the message did not reach backend a")
        # a message from another backend arrives without a reload (bridged b -> a)
        api.say("b", "#general", "zoe", "from b, live")
        self.until(lambda: any(t.endswith("from b, live") for t in self.texts(d)), "the live message never showed")
        # markup is text: shown literally, no element made, no script run
        api.say("b", "#general", "mallory", XSS)
        compose.send_keys(XSS, Keys.ENTER)
        self.until(lambda: sum(t.endswith(XSS) for t in self.texts(d)) == 2, "the markup message did not show as text")
        self.assertEqual(d.find_elements(By.CSS_SELECTOR, "#messages img, #messages script"), [])
        self.assertIsNone(d.execute_script("return window.__xss"))
        # reload: the token is remembered; the history is there
        d.refresh()
        self.until(lambda: d.find_elements(By.CSS_SELECTOR, sel), "after a reload the rooms never showed")
        d.find_element(By.CSS_SELECTOR, sel).click()
        self.until(lambda: any(t.endswith("from b, live") for t in self.texts(d)), "after a reload the history is missing")
        self.assertIn("hello from the browser", self.texts(d))
        self.assertIsNone(d.execute_script("return window.__xss"))
        # admins get the status view
        self.until(lambda: d.find_element(By.ID, "status-button").is_displayed(), "no status button for an admin")
        d.find_element(By.ID, "status-button").click()
        self.until(lambda: "Backends" in d.find_element(By.ID, "status-body").text, "the status view is empty")
        self.assertIn("running", d.find_element(By.ID, "status-body").text)

    def test_a_wrong_token_is_refused_and_users_see_no_status(self):
        api = Api(self)
        bob = api.user_add("bob")
        api.room_id("a", "#general")
        d = self.browser()
        d.get("http://127.0.0.1:%d/" % api.port)
        d.find_element(By.ID, "token").send_keys("sgt_not-a-token")
        d.find_element(By.ID, "login-button").click()
        self.until(lambda: d.find_element(By.ID, "error").is_displayed(), "no error for a wrong token")
        self.assertIn("not valid", d.find_element(By.ID, "error").text)
        token = d.find_element(By.ID, "token")
        token.clear()
        token.send_keys(bob)
        d.find_element(By.ID, "login-button").click()
        self.until(lambda: d.find_elements(By.CSS_SELECTOR, "[data-room]"), "bob's room list never showed")
        self.until(lambda: d.execute_script("return document.body.dataset.loggedIn") == "true", "never logged in")
        self.assertFalse(d.find_element(By.ID, "status-button").is_displayed())


if __name__ == "__main__":
    unittest.main()
