"""The phases of a run as the page shows them (app/phases.py): the current one with its progress, every phase with its
time, under ids and attributes a browser test reads."""

import re

from lora_dpo_app.phases import phases_html


def entry(name, started, ended=None, done=0, total=None, unit=None, detail=None):
    return {"name": name, "started": started, "ended": ended, "done": done, "total": total, "unit": unit,
            "detail": detail}


RUNNING = [entry("tokenising data", 100.0, 100.4, 64, 64, "row", "tokenising toy"),
           entry("loading the model", 100.5, 103.7),
           entry("reference pass", 104.0, 230.0, 7, 7, "batch", "reference pass (200 held-out pairs)"),
           entry("training", 240.0, None, 12, 30, "step", "dpo"),
           entry("evaluation", 300.0, None, 2, 7, "batch", "evaluation (200 held-out pairs)")]


def states(html):
    return re.findall(r"<li data-phase='([^']*)' data-state='(\w+)' data-count='\d+'(?: data-seconds='([\d.]+)')?",
                      html)


def test_the_current_phase_is_the_innermost_open_one_with_its_progress():
    html = phases_html(RUNNING, now=312.0)
    assert html.startswith("<div id='phases' data-current='evaluation'>")
    assert ("<div id='phase-current' data-phase='evaluation' data-state='running' data-done='2' data-total='7'>"
            "<b>evaluation</b> 2/7 batches <progress max='7' value='2'></progress> · 12 s") in html
    assert "<span class='phase-detail'>evaluation (200 held-out pairs)</span>" in html


def test_every_phase_is_listed_with_its_duration_or_the_time_since_it_started():
    html = phases_html(RUNNING, now=312.0)
    assert states(html) == [("tokenising data", "done", "0.4"), ("loading the model", "done", "3.2"),
                            ("reference pass", "done", "126.0"), ("training", "running", "72.0"),
                            ("evaluation", "running", "12.0")]
    times = re.findall(r"<span class='phase-time'>([^<]*)</span>", html)
    assert times == ["&lt;1 s", "3 s", "2 min 06 s", "1 min 12 s", "12 s"]


def test_a_phase_that_recurs_is_one_line_with_its_count_and_time_in_all():
    evaluations = [entry("training", 0.0, 100.0, 30, 30, "step"),
                   *[entry("evaluation", 10.0 * k, 10.0 * k + 1.5, 7, 7, "batch") for k in range(1, 5)]]
    html = phases_html(evaluations, now=200.0)
    assert states(html) == [("training", "done", "100.0"), ("evaluation", "done", "6.0")]
    assert "<li data-phase='evaluation' data-state='done' data-count='4' data-seconds='6.0'>evaluation ×4 " in html


def test_a_phase_without_a_total_shows_no_bar_and_no_zero_count():
    html = phases_html([entry("loading the model", 10.0)], now=4000.0)
    assert "<progress" not in html and "data-total=''" in html
    assert "<b>loading the model</b> · 1 h 06 min</div>" in html


def test_a_finished_run_has_no_current_phase_and_an_ended_job_stops_the_open_ones():
    done = [dict(p, ended=p["ended"] or 400.0) for p in RUNNING]
    html = phases_html(done, now=500.0)
    assert "data-current=''" in html and "data-state='done'>all phases done" in html
    assert {state for _, state, _ in states(html)} == {"done"}
    stopped = phases_html(RUNNING, now=320.0, live=False)  # the job failed or was stopped inside evaluation
    assert "<div id='phase-current' data-phase='evaluation' data-state='stopped'" in stopped
    assert [s for _, s, _ in states(stopped)] == ["done", "done", "done", "stopped", "stopped"]


def test_no_phase_yet_is_a_waiting_trainer():
    assert phases_html([], now=1.0) == ("<div id='phases' data-current=''><div id='phase-current' data-phase='' "
                                        "data-state='waiting'>starting the trainer</div><ol id='phase-list'></ol></div>")
    assert "data-state='stopped'" in phases_html([], now=1.0, live=False)


def test_names_are_escaped_and_odd_numbers_are_left_out():
    html = phases_html([{"name": "<b>x</b>' onmouseover='y", "started": "soon", "done": float("nan"),
                         "total": True, "detail": "<i>"}], now=5.0)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;&#x27; onmouseover=&#x27;y" in html
    assert "&lt;i&gt;" in html and "<progress" not in html and "data-seconds" not in html
