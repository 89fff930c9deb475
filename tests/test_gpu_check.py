"""The device check's CPU mode: its comparisons run and pass, every figure reaches the JSON file the
docs table is made from, the rows that need CUDA say so instead of passing, and a row broken on
purpose FAILs without stopping the rows after it."""
import json
import re

from bench.gpu_check import main
from bench.gpu_check_support import BOUNDS

FAST = ["--small", "--device", "cpu", "--steps", "4", "--tokens", "2"]
COMPARED = {"streamed": "streamed vs resident", "paged": "paged vs resident", "int8": "int8 kernels vs dequantized",
            "fp8": "fp8 kernels vs dequantized", "int4": "int4 kernels vs dequantized"}


def summary(out: str) -> dict:
    """row -> status, from the summary's one line per row."""
    tail = out.split("\nsummary\n", 1)[1]
    return {m.group(2): m.group(1) for m in re.finditer(r"^(ok|FAIL|skip \([^)]*\))\s+([\w-]+)", tail, re.M)}


def test_cpu_mode_compares_and_records_every_figure(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert main(FAST + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    status = summary(out)
    assert status == {"graph": "skip (needs CUDA)", "sdpa": "ok", "streamed": "ok", "offload": "skip (needs CUDA)",
                      "paged": "ok", "int8": "ok", "fp8": "ok", "int4": "ok", "alloc-async": "skip (needs CUDA)",
                      "cuda1": "skip (needs CUDA)"}, out
    report = json.loads(path.read_text())
    rows = report["rows"]
    assert report["copy_gbps"] > 0 and report["bounds"] == BOUNDS
    for row, label in COMPARED.items():
        c = rows[row]["comparisons"][label]
        assert c["ok"] and len(c["per_token"]) == 8 and 0 <= c["max"] <= c["bound"], (row, c)
        if row != "paged":  # paged runs 8 tokens for its comparison only (copies per layer, no timing)
            speed = rows[row]["speed"][0]
            assert speed["ms_per_token"] > 0 and speed["floor_ms"] > 0 and speed["s_per_image"] > speed["prefill_s"]
    assert rows["int4"]["comparisons"]["int4 kernels vs dequantized"]["bound"] == BOUNDS["bfloat16"]  # bf16 into it
    assert rows["int8"]["matrices"] == 6 * 7  # every decoder matrix got its dequantized twin
    checks = rows["paged"]["checks"]
    assert all(checks[k]["ok"] for k in ("no whole-step CUDA graph", "layers paged in", "weights back in RAM"))
    assert set(rows["sdpa"]["sdpa"]) == {"prefill", "token step", "captured step", "Self-CoT step"}
    assert all(rows["sdpa"]["sdpa"].values())  # a kernel seen at every call site
    child = rows["alloc-async"]["child"]["rows"]  # the child process ran, and compared what a CPU can
    assert child["paged"]["status"] == "ok" and child["graph"]["status"] == "skip (needs CUDA)"

    assert main(["--table", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| streamed | ok | streamed vs resident " in table and "| alloc-async/paged | ok |" in table
    assert re.search(r"^\| int4 \| eager \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|  \|$", table, re.M), table
    assert "| graph | skip (needs CUDA) |" in table


def test_a_broken_row_fails_and_the_next_rows_still_run(tmp_path, capsys):
    path = tmp_path / "check.json"
    code = main(FAST + ["--rows", "streamed,paged,int4", "--fault", "streamed", "--fault", "paged:raise",
                        "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert summary(out) == {"streamed": "FAIL", "paged": "FAIL", "int4": "ok"}, out
    rows = json.loads(path.read_text())["rows"]
    c = rows["streamed"]["comparisons"]["streamed vs resident"]
    assert not c["ok"] and c["max"] > 10 * c["bound"]  # the tokens moved, and the bound saw it
    assert rows["paged"]["note"].startswith("RuntimeError: fault injected") and "Traceback" in out
    assert rows["int4"]["comparisons"]["int4 kernels vs dequantized"]["ok"]
