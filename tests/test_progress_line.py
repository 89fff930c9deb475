"""The command line's progress line: its speed estimate, its text, and how it is written to a
terminal, to a log, and not at all with --quiet. Times are multiples of 1/8 s, exact in binary,
so the rates below are exact."""
import io
import re

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from nextstep_core.progress_line import ProgressLine, RateTracker, format_duration, format_rate, progress_text

STEP = 0.125  # seconds per token: 8 tok/s


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_formats():
    assert [format_duration(s) for s in (0, 7.4, 754, 3723, None, -1, float("nan"))] == [
        "0:00", "0:07", "12:34", "1:02:03", "—", "—", "—"]
    assert [format_rate(r) for r in (4.678, 31.25, 1234.4, None, float("inf"))] == ["4.68", "31.2", "1,234", "—", "—"]
    assert progress_text(412, 1024, 31.25, 13, 20) == "412/1,024 tokens · 31.2 tok/s · 0:13 elapsed · ETA 0:20"
    assert progress_text(1024, 1024, 8, 128, 0).endswith(" · done")
    assert progress_text(1, 1024, None, 2, None) == "1/1,024 tokens · — tok/s · 0:02 elapsed · ETA —"


def test_rate_and_eta_at_a_steady_speed():
    tr = RateTracker()
    for k in range(1, 51):
        tr.add(k, 100, k * STEP)
    assert tr.rate == 8.0 and tr.eta == 50 / 8
    tr.add(100, 100, 100 * STEP)
    assert tr.eta == 0.0


def test_a_slow_first_token_is_forgotten_once_outside_the_window():
    """Warm-up (a 30 s first step, e.g. a compile) then 8 tok/s: the rate follows the window rule
    of the editor's status line (last 20 s or the later half of the pass, whichever is longer)."""
    tr = RateTracker()
    tr.add(1, 2000, 0.0)
    tr.add(2, 2000, 30.0)
    for k in range(1, 201):  # 25 s at 8 tok/s: the later half of the pass (27.5 s) still reaches t=0
        tr.add(2 + k, 2000, 30.0 + k * STEP)
    assert tr.rate == 201 / 55.0
    for k in range(201, 321):  # t = 70: the window is the last 35 s, all of it at 8 tok/s
        tr.add(2 + k, 2000, 30.0 + k * STEP)
    assert tr.rate == 8.0
    assert tr.eta == (2000 - 322) / 8.0


def test_a_new_pass_restarts_the_estimate():
    tr = RateTracker()
    assert tr.add(1, 10, 0.0)
    assert not tr.add(2, 10, 1.0) and tr.rate == 1.0
    assert not tr.add(2, 10, 5.0), "a repeated count is ignored"
    assert tr.add(1, 10, 6.0) and tr.rate is None, "a smaller count starts a new pass"
    assert tr.add(1, 20, 6.5), "so does another total"


def test_terminal_one_line_rewritten_in_place():
    clock, out = Clock(), Tty()
    line = ProgressLine(out, clock=clock)
    assert line.tty
    clock.t += 2.0  # prompt encoding before the first token
    for k in range(1, 65):
        clock.t += STEP
        line(k, 64)
    text = out.getvalue()
    assert text.startswith("\r1/64 tokens · — tok/s · 0:02 elapsed · ETA —")
    # the last line is padded with blanks over the longer line before it, then ended
    assert re.search(r"\r64/64 tokens · 8\.00 tok/s · 0:10 elapsed · done {4}\n$", text)
    assert text.count("\n") == 1, "one line, ended once"
    writes = text.split("\r")[1:]
    assert 16 <= len(writes) <= 33, "repainted about every 0.25 s, not for every token"
    assert any(w.startswith("33/64 tokens · 8.00 tok/s · 0:06 elapsed · ETA 0:04") for w in writes), writes


def test_terminal_blanks_what_a_longer_earlier_line_left():
    clock, out = Clock(), Tty()
    line = ProgressLine(out, clock=clock)
    line(999, 1000)
    first = out.getvalue()
    clock.t += 1
    line(1, 10)  # a new pass: a shorter line
    second = out.getvalue()[len(first):]
    text = progress_text(1, 10, None, 1, None)
    assert second == "\r" + text.ljust(len(first) - 1)


def test_log_gets_plain_lines_now_and_then_and_the_last_one():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine(out, clock=clock)
    assert not line.tty
    for k in range(1, 401):  # 50 s
        clock.t += STEP
        line(k, 400)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("1/400 tokens")
    assert lines[-1] == "400/400 tokens · 8.00 tok/s · 0:50 elapsed · done"
    assert len(lines) == 6, lines  # t = 0, 10, 20, 30, 40 s and the end
    assert lines[2] == "161/400 tokens · 8.00 tok/s · 0:20 elapsed · ETA 0:30"


def test_quiet_writes_nothing():
    out = Tty()
    line = ProgressLine(out, quiet=True)
    for k in range(1, 11):
        line(k, 10)
    assert out.getvalue() == ""


def test_storyboard_panels_are_counted():
    clock, out = Clock(), io.StringIO()
    line = ProgressLine(out, passes=3, clock=clock)
    for _panel in range(2):
        for k in range(1, 9):
            clock.t += STEP
            line(k, 8)
    lines = out.getvalue().splitlines()
    assert [ln.split(" · ")[0] for ln in lines] == ["panel 1/3", "panel 1/3", "panel 2/3", "panel 2/3"]
    assert re.fullmatch(r"panel 2/3 · 8/8 tokens · 8\.00 tok/s · 0:02 elapsed · done", lines[-1])


def test_on_a_gpu_the_speed_counts_tokens_done_not_tokens_queued():
    """The loop queues a token every 1/64 s while the device computes one every 1/8 s: the line waits
    for the device before it reads the time, once per line written, never per token."""
    clock, out = Clock(), io.StringIO()
    start = clock.t
    device = {"queued": 0, "syncs": 0}

    def sync():  # the device finishes token k at start + k/8 s
        device["syncs"] += 1
        clock.t = max(clock.t, start + device["queued"] * STEP)
    line = ProgressLine(out, clock=clock, sync=sync)
    for k in range(1, 401):
        clock.t += STEP / 8
        device["queued"] = k
        line(k, 400)
    lines = out.getvalue().splitlines()
    assert lines[-1] == "400/400 tokens · 8.00 tok/s · 0:50 elapsed · done"
    assert all(" 8.00 tok/s" in ln for ln in lines[1:]), lines
    assert device["syncs"] == len(lines) < 20


def run_cli(*args):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "nextstep_core", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_cli_reports_speed_and_eta_on_stderr(tiny_model, tmp_path):
    """Through a pipe (not a terminal): plain lines, the last one saying done (--quiet: see
    test_quiet_writes_nothing)."""
    err = run_cli("generate", "--model", tiny_model, "--prompt", "x", "--width", 32, "--height", 48, "--steps", 2,
                  "--out", tmp_path / "x.png")
    lines = err.splitlines()
    assert "\r" not in err
    assert any(re.fullmatch(r"6/6 tokens · \S+ tok/s · \d+:\d\d elapsed · done", ln) for ln in lines), err


def test_cli_storyboard_counts_panels(tiny_model, tmp_path):
    err = run_cli("storyboard", "--model", tiny_model, "--panel", "a", "--panel", "b", "--width", 32, "--height", 32,
                  "--steps", 2, "--out", tmp_path / "s.png")
    done = [ln for ln in err.splitlines() if ln.endswith(" · done")]
    assert [ln.split(" · ")[0] for ln in done] == ["panel 1/2", "panel 2/2"], err
