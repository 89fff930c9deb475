"""What ComfyUI-Manager, the Comfy Registry and ComfyUI itself read from the pack: pyproject,
requirements, license, entry point, and that ComfyUI is only touched through the bridge."""
from __future__ import annotations

import re
import tomllib

from host_stand_in import ROOT, pack  # noqa: F401

PY_FILES = [p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "tests" not in p.parts
            and "bench" not in p.parts]
BRIDGE = ROOT / "nodes" / "bridge.py"


def requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_dependencies_match_requirements_and_are_lower_bounds_only():
    deps = pyproject()["project"]["dependencies"]
    assert deps == requirements()
    for dep in deps:
        name = re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower()
        assert name not in {"torch", "torchvision", "torchaudio", "comfyui"}, dep
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+>=[0-9][0-9A-Za-z.]*", dep), f"{dep}: use a lower bound only"


def test_registry_metadata():
    cfg = pyproject()
    project, comfy = cfg["project"], cfg["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]{0,98}", project["name"])
    assert "comfyui" not in project["name"].lower()  # the Registry's naming advice
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"] == {"file": "LICENSE"}
    urls = project["urls"]
    # comfy-cli reads exactly these keys for the Registry page; others (e.g. "Bug Tracker") are dropped
    assert set(urls) == {"Homepage", "Documentation", "Repository", "Issues"}, sorted(urls)
    repo = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/ComfyUI-NextStep", repo), repo
    assert urls["Homepage"] == repo and urls["Documentation"].startswith(repo)
    assert urls["Issues"] == f"{repo}/issues"
    owner = repo.split("/")[3]
    assert comfy["Icon"].startswith(f"https://raw.githubusercontent.com/{owner}/ComfyUI-NextStep/")
    assert comfy["PublisherId"] and comfy["DisplayName"] == "NextStep" and comfy["Icon"].startswith("https://")
    assert {"web", "workflows"} <= set(comfy["includes"])
    assert (ROOT / "docs" / "icon.png").is_file()


def test_the_owner_placeholder_lives_in_pyproject_only():
    """Until the public repository exists its owner is a placeholder; one file to edit, no stray copy."""
    for path in [*PY_FILES, *ROOT.glob("*.md"), *ROOT.joinpath("docs").glob("*.md"), *ROOT.joinpath("web").glob("*"),
                 *ROOT.joinpath("workflows").glob("*.json"), ROOT / "requirements.txt"]:
        assert "OWNER" not in path.read_text(encoding="utf-8"), path.relative_to(ROOT)


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_entry_point_exports(pack):
    assert set(pack.__all__) == {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"}
    assert pack.WEB_DIRECTORY == "./web" and (ROOT / "web").is_dir()
    assert not hasattr(pack, "comfy_entrypoint")  # V1 and V3 together: V1 would win silently


def test_comfyui_is_only_touched_through_the_bridge():
    host_import = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|comfy_execution|folder_paths|server|nodes|"
                             r"execution|latent_preview)\b", re.M)
    host_name = re.compile(r"[\"'](comfy(\.\w+)*|folder_paths)[\"']")
    for path in PY_FILES:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        assert not host_import.search(text), f"{rel} imports ComfyUI directly"
        if path != BRIDGE:
            assert not host_name.search(text), f"{rel} names a ComfyUI module; go through nodes/bridge.py"
    assert "sys.path" not in "".join(p.read_text(encoding="utf-8") for p in PY_FILES if "nodes" in p.parts)


def test_no_machine_paths_in_pack_files():
    files = [*ROOT.joinpath("nodes").rglob("*.py"), *ROOT.joinpath("workflows").glob("*.json"),
             ROOT / "__init__.py", ROOT / "pyproject.toml", *ROOT.joinpath("docs").glob("nodes*.md")]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(/work/|/tmp/|/home/|/root/|[A-Z]:\\\\Users)", text), path.name
