"""One table of released models: the folder each repo downloads to is recognised as that variant,
gets that variant's card settings, and a missing one is hinted at with that repo."""
from __future__ import annotations

from nextstep_core.checkpoint import VARIANTS, model_variant
from nextstep_core.presets import PRESETS, preset
from nextstep_core.variants import TABLE, by_folder


def test_each_repo_folder_is_its_variant(tmp_path):
    assert VARIANTS == tuple(PRESETS) == tuple(v.name for v in TABLE)
    for v in TABLE:
        folder = tmp_path / v.folder
        folder.mkdir()
        assert model_variant(str(folder)) == v.name, v.folder
        assert preset(v.name)["steps"] == v.card["steps"]
        assert by_folder(v.folder.upper()) is v
    assert [v.name for v in TABLE if v.edit] == ["nextstep1-large-edit"]
