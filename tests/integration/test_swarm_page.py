"""The swarm page at swarm-api's /, in Debian's headless Chromium driven by Selenium: every server
of a real test swarm drawn over its blocks, a screenshot, and the gap of a killed server shown
live. .ci/run installs chromium and chromium-driver where they are missing."""

import shutil
import time

import pytest
from helpers import running_swarm
from localswarm import running_api, until

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
SPANS = ["0:2", "2:4", "4:6"]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,700"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def drawn(browser) -> dict[str, tuple[str, str]]:
    """node id -> (span, state) of every server bar on the page."""
    from selenium.webdriver.common.by import By

    bars = browser.find_elements(By.CSS_SELECTOR, ".server")
    return {b.get_attribute("data-node"): (b.get_attribute("data-span"), b.get_attribute("data-state")) for b in bars}


def gaps(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [g.get_attribute("data-span") for g in browser.find_elements(By.CSS_SELECTOR, ".gap[data-span]")]


def test_the_page_draws_every_server_over_its_blocks_and_shows_a_killed_servers_gap(model_dirs, browser, tmp_path):
    d = model_dirs("llama")
    with running_swarm(d, SPANS) as (servers, gw), running_api(gw) as url:
        browser.get(url + "/")
        want = {s.node_id: (span, "online") for s, span in zip(servers, SPANS)}
        until(lambda: drawn(browser) == want, 15, "the page to draw the three servers")
        assert gaps(browser) == []
        bar = browser.find_element("css selector", f'.server[data-node="{servers[1].node_id}"]')
        title = bar.get_attribute("title")
        assert "blocks 2:4" in title and "throughput" in title and "RTT" in title and "sessions" in title
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

        servers[1].kill()
        t0 = time.monotonic()
        until(lambda: gaps(browser) == ["2:4"], 10, "the page to show the killed server's blocks as a gap")
        took = time.monotonic() - t0
        print(f"gap shown {took:.1f} s after the kill")
        assert took < 10
        assert drawn(browser)[servers[0].node_id] == ("0:2", "online")
        assert drawn(browser)[servers[1].node_id][1] != "online"
