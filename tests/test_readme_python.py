"""The README's Python example runs as written, on a tiny checkpoint on the CPU (only its first
line of values changes), so the engine's face it shows cannot drift from the code."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tiny_model, capsys):
    code = python_example()
    values = 'folder, device, dtype, size = "models/nextstep/NextStep-1-Large", "cuda", torch.bfloat16, 512'
    assert values in code
    code = code.replace(values, f"folder, device, dtype, size = {str(tiny_model)!r}, 'cpu', torch.float32, 32")
    code = code.replace("steps=28", "steps=2")
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    assert tuple(scope["image"].shape) == (32, 32, 3)
    assert len(scope["panels"]) == 2 and scope["panels"][1].context.panels == 2
    assert scope["shape"].grid == (2, 2) and scope["shape"].rows == 2
    assert "GiB beside the weights" in capsys.readouterr().out
