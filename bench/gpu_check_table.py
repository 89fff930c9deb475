"""The markdown tables of docs/benchmarks.md's device-check section, made from the JSON file that
bench/gpu_check.py writes (`python bench/gpu_check.py --table gpu_check.json`), so that what the
docs say is what a run measured."""
from __future__ import annotations


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _flatten(rows: dict, prefix: str = "", suffix: str = ""):
    """(name, row, suffix for its speed paths) for every row, a child process's rows under their parent's."""
    for name, row in rows.items():
        yield prefix + name, row, suffix
        report = row.get("child")
        if report:
            tag = report.get("run_device") if name != "alloc-async" else report.get("allocator") or "no CUDA allocator"
            yield from _flatten(report["rows"], f"{prefix}{name}/", f"{suffix}, {tag}")


def table(report: dict) -> str:
    head = (f"{report['device']}, torch {report['torch']}, {report['shapes']} shapes, {report['dtype']}, "
            f"{report['steps']} steps, cfg {report['cfg']}, prompt {report['prompt']} x 2 rows, "
            f"{report['compare_tokens']} tokens compared, {report['timed_tokens']} timed; copy bandwidth "
            f"{report['copy_gbps']:.0f} GB/s" + (f", host to device {report['host_gbps']:.1f} GB/s"
                                                  if report.get("host_gbps") else "")
            + (f"; allocator {report['allocator']}" if report.get("allocator") else "") + f" ({report['date']}).")
    out = [head, "", "| row | result | tokens compared: worst error (bound) | other checks |", "|---|---|---|---|"]
    speeds = []
    for name, row, suffix in _flatten(report["rows"]):
        comps = "; ".join(f"{label} {c['max']:.1e} ({c['bound']:g})" for label, c in row.get("comparisons", {}).items())
        checks = [f"{label}: {c['detail']}" for label, c in row.get("checks", {}).items()
                  if not label.endswith("in the child")]
        if row.get("kernel"):
            checks.insert(0, "kernel choice: " + ", ".join(f"{k} {v}" for k, v in row["kernel"].items()))
        checks = "; ".join(checks)
        out.append(f"| {name} | {row['status']} | {comps} | {checks} |")
        speeds += [dict(s, path=s["path"] + suffix) for s in row.get("speed", [])]
    out += ["", "| decoder weights | path | ms/token | floor ms/token | s/image | prefill s | peak GB |",
            "|---|---|---|---|---|---|---|"]
    for s in speeds:
        out.append(f"| {s['weights']} | {s['path']} | {_num(s['ms_per_token'], '.2f')} | "
                   f"{_num(s['floor_ms'], '.2f')} | {_num(s['s_per_image'], '.1f')} | {_num(s['prefill_s'], '.2f')} | "
                   f"{_num(s['peak_gb'], '.1f')} |")
    return "\n".join(out)
