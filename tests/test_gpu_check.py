"""The device check script keeps running: its CPU mode on toy shapes, every section, and the
capped rows placed by the memory model with layers actually streamed."""
import re

from bench.gpu_check import main


def test_gpu_check_runs_on_cpu_with_small_shapes(capsys):
    main(["--small", "--device", "cpu", "--tokens", "1", "--steps", "2", "--formats", "int4", "--caps", "8",
          "--cap-formats", "int4"])
    out = capsys.readouterr().out
    assert re.search(r"^\| int4 \| off \| [\d.]+ \| [\d.]+ \|", out, re.M), out
    row = re.search(r"^\| 8 \| int4 \| (\d+)/6 \| ([\d.e-]+) \|", out, re.M)
    assert row and int(row.group(1)) < 6 and float(row.group(2)) > 0, out  # some layers streamed
