"""The README's memory table is what the memory model says (bench/memory_table.py prints it)."""
from pathlib import Path

from bench.memory_table import table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_memory_table_is_the_memory_models():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- memory-table (bench/memory_table.py) -->\n") + len("<!-- memory-table (bench/memory_table.py) -->\n")
    end = text.index("\n<!-- /memory-table -->")
    assert text[start:end] == table(), "README's memory table is stale: paste `python bench/memory_table.py` into it"
    assert "| 12 GB (RTX 3060 12GB) | int4 | all 48 (resident) |" in text  # the 12 GB promise
