"""The UI in headless Chromium: the profilers table, the flame graph, zooming, and hostile names
that must stay text."""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import IN_CI
from tests.helpers import browser
from tests.helpers.ui_fakes import EVIL, running_ui

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def ui():
    reason = browser.missing_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"browser test cannot run under CI=true: {reason}")
        pytest.skip(reason)
    run_dir = tempfile.mkdtemp(prefix="ui-", dir="/tmp")
    try:
        with running_ui(run_dir) as (ui, _pipeline):
            yield ui
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def driver():
    with browser.chromium() as d:
        yield d


def row_of(driver, comm: str):
    """The profilers table's row whose comm label is exactly this text."""
    for row in driver.find_elements(By.CSS_SELECTOR, "#targets tbody tr"):
        values = [c.text for c in row.find_elements(By.CSS_SELECTOR, ".chip")]
        if f"comm={comm}" in values:
            return row
    return None


def frame_width(driver, name: str) -> float:
    return driver.execute_script(
        "const g = [...document.querySelectorAll('#flamegraph g.frame')]"
        "  .find((g) => g.getAttribute('name') === arguments[0]);"
        "return g ? Number(g.querySelector('rect').getAttribute('width')) : -1;", name)


def frame_names(driver) -> set[str]:
    return {g.get_attribute("name")
            for g in driver.find_elements(By.CSS_SELECTOR, "#flamegraph g.frame")}


def script_errors(driver) -> list[str]:
    # CSP violations and uncaught errors are SEVERE console entries.
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and "favicon" not in e["message"]]


def chain_cells(driver) -> list[str] | None:
    row = row_of(driver, "chain")
    return [c.text for c in row.find_elements(By.TAG_NAME, "td")] if row else None


def click_show_profile(driver, comm: str) -> bool:
    row = row_of(driver, comm)
    if row is None:
        return False
    row.find_element(By.LINK_TEXT, "Show Profile").click()
    return True


def test_show_profile_draws_a_flame_graph_that_zooms(ui, driver):
    driver.get(ui.base + "/")
    # The table is redrawn every few seconds: an element found just before may go stale, so
    # every look at a row is retried until it reads a whole row.
    wait = WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,))
    cells = wait.until(chain_cells)
    assert cells[0] == "parca_agent_cpu"
    assert cells[2].endswith("s ago")
    assert cells[3] == "—"
    collector = '[data-service="collector"]'
    wait.until(lambda d: "alive" in d.find_element(By.CSS_SELECTOR, collector).text)
    browser.screenshot(driver, "ui-profilers")

    wait.until(lambda d: click_show_profile(d, "chain"))
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#flamegraph g.frame")))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#top tbody tr"))
    names = frame_names(driver)
    assert {"main", "outer", "middle", "leaf"} <= names
    assert driver.find_element(By.CSS_SELECTOR, "#top tbody tr td").text == "leaf"
    full = driver.execute_script(
        "return Number(document.querySelector('#flamegraph svg').getAttribute('width'))")
    wait.until(lambda d: frame_width(d, "leaf") > 0)
    assert frame_width(driver, "leaf") < 0.95 * full  # 90 % of the samples before the zoom

    # Hovering a frame shows its share of the total.
    target = next(g for g in driver.find_elements(By.CSS_SELECTOR, "#flamegraph g.frame")
                  if g.get_attribute("name") == "middle")
    ActionChains(driver).move_to_element(target).perform()
    wait.until(lambda d: "middle" in d.find_element(By.ID, "details").text)
    assert "97.00% of the total" in driver.find_element(By.ID, "details").text

    # Clicking the leaf zooms to it: it takes the whole width.
    leaf = next(g for g in driver.find_elements(By.CSS_SELECTOR, "#flamegraph g.frame")
                if g.get_attribute("name") == "leaf")
    leaf.click()  # lands on the frame's label, inside the frame, as a person's click does
    wait.until(lambda d: abs(frame_width(d, "leaf") - full) < 1)

    # Search highlights the matching frames and says how much they hold.
    driver.find_element(By.ID, "search").send_keys("midd")
    wait.until(lambda d: d.find_element(By.ID, "details").text.startswith("search: 1 frame,"))
    assert "97.00% of the total" in driver.find_element(By.ID, "details").text
    time.sleep(0.5)  # let the zoom and highlight transitions finish before the picture
    browser.screenshot(driver, "ui-flamegraph")
    assert script_errors(driver) == []


def test_range_choice_merges_the_history(ui, driver):
    driver.get(ui.base + "/")
    wait = WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: click_show_profile(d, "chain"))
    wait.until(lambda d: "1 window," in d.find_element(By.ID, "profile-summary").text)
    driver.find_element(By.CSS_SELECTOR, "#range option[value='5m']").click()
    wait.until(lambda d: " windows," in d.find_element(By.ID, "profile-summary").text)
    assert driver.find_element(By.ID, "download").get_attribute("href").endswith(".pb.gz?range=5m")


def test_hostile_process_name_stays_text(ui, driver):
    driver.get(ui.base + "/")
    wait = WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,))
    wait.until(lambda d: row_of(d, EVIL) is not None)
    assert driver.find_elements(By.TAG_NAME, "img") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 (reading it is the check)
    wait.until(lambda d: click_show_profile(d, EVIL))
    WebDriverWait(driver, 15).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "#flamegraph g.frame")))
    assert EVIL in driver.find_element(By.CSS_SELECTOR, "#profile .labels").text
    names = frame_names(driver)
    assert "<script>alert(2)</script>" in names
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert len(driver.find_elements(By.TAG_NAME, "script")) == 3  # only the page's own
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    assert script_errors(driver) == []

