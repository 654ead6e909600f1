#!/usr/bin/env python3
"""A screenshot of the swarm page (swarm-api's /) for the README, on the real model.

    python tools/page_screenshot.py [--out docs/swarm-page.png]

Starts four daemons serving SmolLM2-135M-Instruct (0:10, 10:20, 20:30 and a second copy of
15:30) behind a gateway-only daemon, swarm-api on the gateway's config, and Debian's headless
Chromium through Selenium; asks a question in the page's chat box, waits for the streamed answer,
and saves the window as a PNG."""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from localswarm import running_api, running_swarm  # noqa: E402

SPANS = ["0:10", "10:20", "20:30", "15:30"]
QUESTION = "In one sentence: what is a swarm of bees?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "swarm-page.png"))
    p.add_argument("--model", default="smollm2-135m-instruct")
    a = p.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from libswarm.models import get_model

    d = get_model(a.model, os.path.join(os.path.dirname(HERE), ".cache", "models"))
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,760"):
        opts.add_argument(arg)
    with running_swarm(d, SPANS) as (servers, gw), running_api(gw) as url:
        browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            browser.get(url + "/")
            deadline = time.monotonic() + 30
            while len(browser.find_elements(By.CSS_SELECTOR, '.server[data-state="online"]')) < len(SPANS):
                if time.monotonic() > deadline:
                    raise SystemExit("the page did not show every server online in 30 s")
                time.sleep(0.2)
            browser.find_element(By.ID, "prompt").send_keys(QUESTION)
            browser.find_element(By.ID, "send").click()
            while "finished" not in browser.find_element(By.ID, "chatinfo").text:
                if time.monotonic() > deadline + 60:
                    raise SystemExit("no answer in the chat box")
                time.sleep(0.2)
            time.sleep(1.6)  # one more refresh: the session count and throughput settle
            browser.save_screenshot(a.out)
            print(f"wrote {a.out}: {browser.find_element(By.ID, 'answer').text!r}")
        finally:
            browser.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
