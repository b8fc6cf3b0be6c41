"""report.html: self-contained, escaped, rows in the documented order; and what headless Chromium shows.

The browser test needs Debian's `chromium` and `chromium-driver`. Without them it skips, unless
INSTRUCTGLM_REQUIRE_BROWSER=1 (set by CI), where a missing browser is a failure. Its screenshot is
written to the test's tmp dir, and also to $INSTRUCTGLM_SCREENSHOT_DIR when that is set.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instructglm.eval.report import order_rows, render_report, write_report
from instructglm.eval.results import EvalData, EvalResults, ModelResult, metrics_document

ATTACK = "<img src=x onerror=\"window.__pwned = 1\"> & <script>window.__pwned = 2</script>"


def row_scores(rouge_l: float, bleu: float = 0.0) -> dict:
    return {"bleu-4": bleu, "rouge-1": rouge_l, "rouge-2": 0.0, "rouge-l": rouge_l, "exact_match": 100.0 if rouge_l == 100 else 0.0, "loss": 1.5}


def sample_results() -> EvalResults:
    """Two models on five rows: row 3 improves most, row 1 is hurt most, row 4 is unchanged."""
    rows = [
        {"context": "Instruction: 把数字写成中文\nInput: 12\nAnswer: ", "target": "十二"},
        {"context": f"Instruction: repeat this\nInput: {ATTACK}\nAnswer: ", "target": ATTACK},
        {"context": "Instruction: next number\nInput: 41\nAnswer: ", "target": "42"},
        {"context": "Instruction: upper-case\nInput: a b c\nAnswer: ", "target": "A B C"},
        {"context": "Instruction: say nothing\nAnswer: ", "target": "ok"},
    ]
    data = EvalData("data/test.jsonl", "ab" * 32, "converted", "alpaca", rows, total_rows=5)
    metrics = {
        "base": {"bleu-4": 3.5, "rouge-1": 10.0, "rouge-2": 0.0, "rouge-l": 10.0, "exact_match": 0.0, "loss": 5.9, "perplexity": 365.0, "rows": 5},
        "run": {"bleu-4": 60.2, "rouge-1": 70.0, "rouge-2": 20.0, "rouge-l": 70.0, "exact_match": 60.0, "loss": 0.8, "perplexity": 2.2, "rows": 5},
    }
    benchmark = {
        "benchmark": "ceval", "path": "bench/ceval", "split": "val",
        "0-shot": {"average": 25.0, "overall": 20.0, "questions": 5, "shots_dropped": 0,
                   "subjects": {"arithmetic": {"accuracy": 33.3, "correct": 1, "questions": 3}, "geography": {"accuracy": 0.0, "correct": 0, "questions": 2}}},
    }
    base = ModelResult("base", "tiny/base", None, metrics["base"], ["十一", "", "7", "A B C", "no"],
                       [row_scores(0), row_scores(50, 40), row_scores(0), row_scores(100), row_scores(0)], benchmark)
    run = ModelResult("run", "tiny/base", "runs/run", metrics["run"], ["十二", ATTACK[:20], "42", "A B C", "ok"],
                      [row_scores(100), row_scores(10), row_scores(100, 100), row_scores(100), row_scores(100, 50)], benchmark)
    return EvalResults(data, {"max_new_tokens": 12, "do_sample": False, "seed": 42}, [base, run])


def test_rows_are_ordered_most_improved_then_most_hurt_then_unchanged():
    note, sections = order_rows(sample_results(), max_rows=100)
    assert [(name.split(" ")[0] + " " + name.split(" ")[1], rows) for name, rows in sections] == [
        ("Most improved", [2, 4, 0]), ("Most hurt", [1]), ("No change", [3])
    ]
    assert "run's rouge-l minus base's" in note
    _, capped = order_rows(sample_results(), max_rows=2)
    assert [rows for _, rows in capped] == [[2], [1]]  # half from each end


def test_page_is_self_contained_and_escaped(tmp_path):
    page = write_report(tmp_path, sample_results()).read_text(encoding="utf-8")
    assert "<script" not in page and "onerror=" not in page.replace("onerror=&quot;", "")
    assert html_escaped(ATTACK) in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page) and "<link" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    assert [f.name for f in tmp_path.iterdir()] == ["report.html"]  # no temp file left behind


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_metrics_json_writes_missing_numbers_as_null():
    results = sample_results()
    results.models[0].metrics["loss"] = float("nan")
    assert metrics_document(results)["base"]["loss"] is None


def test_charts_do_not_touch_pyplot(tmp_path):
    code = (
        "import sys; from tests.eval.test_report import sample_results; from instructglm.eval.report import write_report; "
        f"write_report({str(tmp_path)!r}, sample_results()); print('matplotlib.pyplot' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), str(Path(__file__).parents[2] / "src")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "headless Chromium is not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("INSTRUCTGLM_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + "; INSTRUCTGLM_REQUIRE_BROWSER=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1800",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_report_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    report = write_report(tmp_path / "out", sample_results())
    browser.get(report.resolve().as_uri())
    assert browser.title == "InstructGLM eval: base, run"
    # both charts decoded, and nothing was fetched but the page's own data: URLs
    sizes = browser.execute_script("return Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(sizes) == 2 and all(done and w > 300 and h > 100 for done, w, h in sizes), sizes
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith("data:") for name in fetched), fetched
    # the metrics table: one column per model, the best value bold
    cells = {row.find_element(By.TAG_NAME, "th").text: [td.text for td in row.find_elements(By.TAG_NAME, "td")]
             for row in browser.find_elements(By.CSS_SELECTOR, "#metrics tr")[1:]}
    assert cells["exact_match"] == ["0.00", "60.00"] and cells["loss"] == ["5.90", "0.80"]
    assert browser.find_element(By.CSS_SELECTOR, "#metrics td.best").text == "60.20"  # bleu-4 of run
    assert "geography" in browser.find_element(By.ID, "benchmark").text
    # examples: most improved first; the markup in the data is shown as text and never runs
    order = [int(tr.get_attribute("data-row")) for tr in browser.find_elements(By.CSS_SELECTOR, "tr.example")]
    assert order == [2, 4, 0, 1, 3]
    assert browser.execute_script("return window.__pwned === undefined")
    assert ATTACK in browser.find_element(By.CSS_SELECTOR, 'tr.example[data-row="1"]').text
    first = browser.find_element(By.CSS_SELECTOR, "tr.example").text
    assert "next number" in first and "42" in first and "rouge-l +100.0" in first
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("INSTRUCTGLM_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["INSTRUCTGLM_SCREENSHOT_DIR"]) / "eval_report.png")
