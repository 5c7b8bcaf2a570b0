"""The dashboard at /ui, driven in headless Chromium (Debian's ``chromium`` with its
``chromedriver``, through Selenium) against the real control plane: log in with the
token, open each page, see a call appear and a container's log line arrive without a
reload, stop an app from the page (with its confirmation). Screenshots of the main
pages go to the test's temp folder (``--basetemp`` keeps them).

The login, cookie and CSRF rules are checked over plain HTTP first (no browser)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from apps import ops_dash
from conftest import wait_until

from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m

APP = "strato-test-ops"
STOPPABLE = "strato-test-ops-stop"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 60.0


def token_of(server) -> str:
    return (server.home / "token").read_text().strip()


@pytest.fixture(scope="module")
def ops_app(strato_server):
    strato_server.activate()
    with ops_dash.app.run(quiet=True):
        ops_dash.double.remote(1)  # a container, a call
        yield ops_dash.app


def app_id_named(name: str) -> str:
    apps = session.api().call("GET", "/apps", None, m.AppList).apps
    return next(a.app_id for a in apps if a.name == name and a.state != "stopped")


# ---------------------------------------------------------------------- plain HTTP


def test_pages_need_a_login(server):
    r = httpx.get(f"{server.url}/ui/containers", timeout=30)
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=/ui/containers"
    assert httpx.get(f"{server.url}/ui/sse/state?view=apps", timeout=30).status_code == 401
    r = httpx.post(f"{server.url}/ui/login", data={"token": "wrong"}, timeout=30)
    assert r.status_code == 401
    assert "not this control plane" in r.text
    assert "set-cookie" not in r.headers


def test_login_sets_a_strict_http_only_cookie_and_post_needs_csrf(server, ops_app):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/ui/login", data={"token": token_of(server), "next": "/ui/nodes"})
        assert r.status_code == 303 and r.headers["location"] == "/ui/nodes"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
        assert token_of(server) not in cookie  # a session MAC, never the token
        page = c.get("/ui")
        assert page.status_code == 200 and APP in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        # an open redirect is refused
        r = c.post("/ui/login", data={"token": token_of(server), "next": "//evil.example/"})
        assert r.headers["location"] == "/ui"
        # a POST without the CSRF token changes nothing
        app_id = app_id_named(APP)
        r = c.post(f"/ui/apps/{app_id}/stop")
        assert r.status_code == 403
        assert app_id_named(APP) == app_id
        # static files are served from the package (no network)
        js = c.get("/ui/static/vendor/htmx.min.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert c.get("/ui/static/../metrics.py").status_code == 404


def test_bearer_token_works_without_a_cookie(server, ops_app):
    r = httpx.get(
        f"{server.url}/ui/nodes",
        headers={"authorization": f"Bearer {token_of(server)}"},
        timeout=30,
    )
    assert r.status_code == 200 and "node-" in r.text


# ---------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver  # the dev extra

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        # .ci/run installs both: a missing browser fails, it never skips the page tests
        pytest.fail("needs Debian's chromium and chromium-driver (apt-get install both)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Screenshots of the main pages (artifacts under the test's temp folder)."""
    return tmp_path_factory.mktemp("dashboard-screenshots")


@pytest.fixture(scope="module")
def ui(browser, strato_server, ops_app):
    """The browser, logged in through the form."""
    from selenium.webdriver.common.by import By

    url = strato_server.url
    browser.get(f"{url}/ui")
    assert "/ui/login" in browser.current_url  # redirected to the form
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "login").click()
    assert "not this control plane" in browser.find_element(By.ID, "login-error").text
    browser.find_element(By.ID, "token").send_keys(token_of(strato_server))
    browser.find_element(By.ID, "login").click()
    wait_until(lambda: browser.current_url.rstrip("/").endswith("/ui"), WAIT_S, "the apps page")
    cookie = browser.get_cookie("strato_ui")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return browser


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def text_of(driver, css: str) -> str:
    return " ".join(e.text for e in find(driver, css))


def live(check):
    """``check`` for wait_until, on a page whose live parts the server re-renders (an
    element found may be swapped out before it is read: then it is looked up again)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt():
        try:
            return check()
        except StaleElementReferenceException:
            return None

    return attempt


def click(driver, css: str) -> None:
    wait_until(live(lambda: find(driver, css)[0].click() or True), WAIT_S, f"to click {css}")


def test_apps_page_lists_the_app_with_its_endpoint(ui, strato_server, shots):
    ui.get(f"{strato_server.url}/ui")
    sel = f'tr.app[data-name="{APP}"][data-state="ephemeral"]'
    wait_until(lambda: find(ui, sel), WAIT_S, "the app's row")
    url = ops_dash.hello.get_web_url()
    assert url and url in text_of(ui, sel)  # the web endpoint's URL
    ui.save_screenshot(str(shots / "apps.png"))


def test_a_call_appears_on_the_app_page_and_opens(ui, strato_server, shots):
    app_id = app_id_named(APP)
    ui.get(f"{strato_server.url}/ui/apps/{app_id}")
    ui.execute_script("window.__no_reload = 1")
    call = ops_dash.double.spawn(21)
    assert call.get(timeout=WAIT_S) == 42
    sel = f'tr.call[data-call-id="{call.object_id}"]'
    wait_until(lambda: find(ui, sel), WAIT_S, "the new call's row (live)")
    assert ui.execute_script("return window.__no_reload") == 1  # arrived without a reload
    wait_until(live(lambda: "success" in find(ui, sel)[0].text), WAIT_S, "the call's status")
    assert "double" in text_of(ui, sel)
    # the charts fill in from the samples (uPlot draws a canvas per chart)
    wait_until(lambda: find(ui, '.fn-charts .chart[data-kind="rate"] canvas'), WAIT_S, "the charts")
    ui.save_screenshot(str(shots / "app.png"))
    click(ui, f"{sel} a")
    wait_until(lambda: find(ui, 'tr.input[data-idx="0"][data-status="success"]'), WAIT_S, "input")


def test_a_failed_input_shows_its_error_and_traceback(ui, strato_server, shots):
    call = ops_dash.explode.spawn(3)
    with pytest.raises(ValueError):
        call.get(timeout=WAIT_S)
    ui.get(f"{strato_server.url}/ui/calls/{call.object_id}")
    wait_until(lambda: find(ui, 'tr.input[data-status="failure"]'), WAIT_S, "failure")
    assert "ValueError: exploded on 3" in text_of(ui, 'tr.input[data-status="failure"]')
    click(ui, "tr.input details summary")
    tb = find(ui, "pre.traceback")[0].get_attribute("textContent")
    assert "raise ValueError" in tb
    ui.save_screenshot(str(shots / "call.png"))


def test_a_containers_log_line_arrives_live(ui, strato_server, tmp_path, shots):
    marker = tmp_path / "go"
    call = ops_dash.chatter.spawn(str(marker))
    try:
        app_id = app_id_named(APP)

        def chatter_container() -> str | None:
            listing = session.api().call(
                "GET", "/containers", None, m.ContainerList, params={"app": app_id}
            )
            for c in listing.containers:
                if c.function_name == "chatter" and c.state == "ready":
                    return c.container_id
            return None

        cid = wait_until(chatter_container, WAIT_S, "chatter's container")
        ui.get(f"{strato_server.url}/ui/containers")
        wait_until(lambda: find(ui, f'tr.container[data-container-id="{cid}"]'), WAIT_S, "row")
        ui.save_screenshot(str(shots / "containers.png"))
        ui.get(f"{strato_server.url}/ui/containers/{cid}")
        wait_until(lambda: "chatter: first line" in text_of(ui, "#logs"), WAIT_S, "first line")
        ui.execute_script("window.__no_reload = 1")
        time.sleep(0.5)  # the page's event stream is connected (it resumes after its seq)
        marker.touch()
        wait_until(lambda: "chatter: saw go" in text_of(ui, "#logs"), WAIT_S, "the live line")
        assert ui.execute_script("return window.__no_reload") == 1
        ui.save_screenshot(str(shots / "container.png"))
    finally:
        marker.touch()
    assert call.get(timeout=WAIT_S) == "done"


def test_stop_a_container_from_its_page(ui, strato_server, tmp_path):
    from selenium.webdriver.common.alert import Alert

    marker = tmp_path / "go"
    call = ops_dash.chatter.spawn(str(marker))
    try:
        cid = wait_until(lambda: _ready_container("chatter"), WAIT_S, "chatter's container")
        ui.get(f"{strato_server.url}/ui/containers/{cid}")
        click(ui, "#stop-container")
        wait_until(lambda: _alert(ui), WAIT_S, "the confirmation")
        assert cid in Alert(ui).text
        Alert(ui).accept()
        wait_until(
            live(lambda: text_of(ui, "#container-state") not in ("", "ready", "starting")),
            WAIT_S,
            "the container to leave",
        )
        wait_until(lambda: cid not in _live_ids(), WAIT_S, "the container to be gone")
    finally:
        marker.touch()
    assert call.get(timeout=WAIT_S) == "done"  # its input went back to the queue and ran


def _containers() -> list[m.ContainerInfo]:
    app_id = app_id_named(APP)
    return (
        session.api()
        .call("GET", "/containers", None, m.ContainerList, params={"app": app_id})
        .containers
    )


def _ready_container(function: str) -> str | None:
    return next(
        (
            c.container_id
            for c in _containers()
            if c.function_name == function and c.state == "ready"
        ),
        None,
    )


def _live_ids() -> set[str]:
    return {c.container_id for c in _containers() if c.state in ("starting", "ready")}


def test_nodes_page_shows_capacity(ui, strato_server, shots):
    ui.get(f"{strato_server.url}/ui/nodes")
    wait_until(lambda: find(ui, "tr.node"), WAIT_S, "a node")
    assert "ready" in text_of(ui, "tr.node") and "MiB" in text_of(ui, "tr.node")
    assert find(ui, "tr.node meter")
    ui.save_screenshot(str(shots / "nodes.png"))


def test_object_pages_that_exist(ui, strato_server):
    """Dicts, queues and secrets (the features this tree has) list their names."""
    import strato

    d = strato.Dict.from_name("ops-dash-dict", create_if_missing=True)
    d["k"] = 1
    ui.get(f"{strato_server.url}/ui/objects/dicts")
    assert "ops-dash-dict" in text_of(ui, "#objects")
    # every object page the nav offers opens (volumes and sandboxes where the tree has them)
    links = [a.get_attribute("href") for a in find(ui, 'header nav a[href^="/ui/objects/"]')]
    kinds = [href.rsplit("/", 1)[1] for href in links]
    assert {"dicts", "queues", "secrets"} <= set(kinds)
    for kind in kinds:
        ui.get(f"{strato_server.url}/ui/objects/{kind}")
        assert find(ui, "h1")[0].text.lower() == kind
        assert not find(ui, "p.error")


def test_stop_an_app_from_the_page(ui, strato_server, shots):
    from selenium.webdriver.common.alert import Alert

    with ops_dash.stoppable.run(quiet=True):
        assert ops_dash.ping.remote() == "pong"
        app_id = app_id_named(STOPPABLE)
        ui.get(f"{strato_server.url}/ui")
        sel = f'tr.app[data-app-id="{app_id}"]'
        wait_until(lambda: find(ui, f"{sel} button.stop"), WAIT_S, "the stop button")
        # dismissing the confirmation changes nothing
        click(ui, f"{sel} button.stop")
        wait_until(lambda: _alert(ui), WAIT_S, "the confirmation")
        Alert(ui).dismiss()
        time.sleep(0.5)  # what a request would have needed to arrive (none is sent)
        assert app_id_named(STOPPABLE) == app_id
        # accepting it stops the app
        click(ui, f"{sel} button.stop")
        wait_until(lambda: _alert(ui), WAIT_S, "the confirmation")
        assert STOPPABLE in Alert(ui).text
        Alert(ui).accept()
        wait_until(
            live(lambda: [r for r in find(ui, sel) if r.get_attribute("data-state") == "stopped"]),
            WAIT_S,
            "the app to show as stopped",
        )
        ui.save_screenshot(str(shots / "apps-stopped.png"))
        with pytest.raises(exc.AppStoppedError):
            ops_dash.ping.remote()


def _alert(driver) -> bool:
    try:
        driver.switch_to.alert  # noqa: B018 - raises while there is none
        return True
    except Exception:
        return False


def test_the_cli_prints_the_url(server):
    from click.testing import CliRunner

    from strato.cli.main import main

    out = CliRunner().invoke(main, ["dashboard", "--no-open"])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == f"{server.url}/ui"


def test_an_open_stream_does_not_hold_the_servers_shutdown():
    """A dashboard left open must not delay a stop: its event streams end when the server
    shuts down (not only at their 55 s cap, past the harness's 30 s wait for the exit)."""
    import signal
    import threading

    from conftest import dedicated_server

    with dedicated_server({}) as other:
        opened = threading.Event()

        def listen() -> None:
            headers = {"authorization": f"Bearer {token_of(other)}"}
            try:
                with httpx.stream(
                    "GET", f"{other.url}/ui/sse/state?view=nodes", headers=headers, timeout=90
                ) as r:
                    for _ in r.iter_bytes():
                        opened.set()
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        assert opened.wait(30), "the stream did not open"
        other.kill(signal.SIGTERM)  # waits for the exit (fails after 30 s)
        t.join(30)
        assert not t.is_alive()
