"""Every example workflow checked against the node definitions the way the editor and ComfyUI
read it: node types exist (here or in core), widget values line up with INPUT_TYPES by position
(seed widgets carry an extra control_after_generate value), links join matching types, every
required socket is connected, nodes do not overlap; then the graph is run on tiny checkpoints.
The storyboard example is also checked for what it teaches: its chain of panels makes the same
images as the single storyboard node beside it."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from host_stand_in import ROOT, host, models_dir, pack  # noqa: F401
from parity_support import assert_images_close
from vllm_stand_in import StandIn

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# The core nodes the examples may use: (socket inputs, widget names, output types), as core declares them.
CORE = {
    "LoadImage": ([], ["image", "upload"], ["IMAGE", "MASK"]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "Note": ([], ["text"], []),
    "MarkdownNote": ([], ["text"], []),
}
UI_ONLY = {"Note", "MarkdownNote"}
MODES = {0: "always", 2: "never (muted)", 4: "bypass"}
TITLE_HEIGHT = 30  # LiteGraph draws the title bar above a node's pos
MIN_GAP = 20  # free canvas between two nodes, so no node touches another
PREVIEW_ROOM = 200  # how far a node grows when its live preview arrives (about 170-200 px in frontend 1.49)
STORY_NODES = ("NextStepStoryStart", "NextStepStoryboardPanel", "NextStepStoryboard")
FAST = {"width": 64, "height": 64, "size": 64, "steps": 2}  # run-time overrides: the checks use the file's values


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def pack_inputs(cls):
    """[(name, spec, required)] in declaration order, as the editor lays them out."""
    it = cls.INPUT_TYPES()
    return [(n, s, sect == "required") for sect in ("required", "optional") for n, s in it.get(sect, {}).items()]


def expected_widgets(cls):
    """[(name, spec)] per position of widgets_values, control_after_generate values included."""
    out = []
    for name, spec, _req in pack_inputs(cls):
        if is_widget(spec):
            out.append((name, spec))
            if spec[1].get("control_after_generate"):
                out.append((name + ".control_after_generate", (sorted(CONTROL_VALUES), {})))
    return out


def check_value(where, spec, value):
    kind, opts = spec[0], spec[1]
    if isinstance(kind, list):
        assert value in kind, f"{where}: {value!r} is not one of {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {value} out of range"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} not a FLOAT"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"


def node_spec(pack, type_):
    """-> (socket inputs [(name, type, required)], widget count check fn, output types)."""
    if type_ in pack.NODE_CLASS_MAPPINGS:
        cls = pack.NODE_CLASS_MAPPINGS[type_]
        sockets = [(n, s[0], req) for n, s, req in pack_inputs(cls) if not is_widget(s)]
        return sockets, expected_widgets(cls), list(cls.RETURN_TYPES)
    assert type_ in CORE, f"unknown node type {type_!r}: not in this pack nor in the core list"
    sockets, widgets, outs = CORE[type_]
    return [(n, t, True) for n, t in sockets], [(w, ("*", {})) for w in widgets], outs


@pytest.fixture(params=WORKFLOWS, ids=lambda p: p.name)
def workflow(request):
    return request.param


def test_the_three_examples_exist():
    assert {p.name for p in WORKFLOWS} >= {"nextstep_t2i.json", "nextstep_edit.json", "nextstep_storyboard.json"}


def test_workflow_matches_the_node_definitions(pack, host, workflow):
    wf = load(workflow)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    assert len(nodes) == len(wf["nodes"]) and len(links) == len(wf["links"])
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(links, default=0)
    for n in wf["nodes"]:
        where = f"{workflow.name} node {n['id']} ({n['type']})"
        sockets, widgets, outs = node_spec(pack, n["type"])
        values = n.get("widgets_values", [])
        assert len(values) == len(widgets), f"{where}: {len(values)} widget values, expected {len(widgets)}"
        for (name, spec), value in zip(widgets, values):
            if spec[0] != "*":
                check_value(f"{where}.{name}", spec, value)
        by_name = {i["name"]: i for i in n.get("inputs", [])}
        for name, typ, required in sockets:
            entry = by_name.get(name)
            if required:
                assert entry is not None and entry.get("link") is not None, f"{where}: {name} is not connected"
            if entry is not None:
                assert entry["type"] == typ, f"{where}: input {name} is {entry['type']}, expected {typ}"
        assert set(by_name) <= {s[0] for s in sockets}, f"{where}: unknown inputs {set(by_name)}"
        assert [o["type"] for o in n.get("outputs", [])] == outs, f"{where}: outputs"
        for slot, o in enumerate(n.get("outputs", [])):
            for lid in o.get("links") or []:
                assert links[lid][1] == n["id"] and links[lid][2] == slot, f"{where}: output link {lid}"
    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        s_out = nodes[src]["outputs"][src_slot]
        d_in = nodes[dst]["inputs"][dst_slot]
        assert s_out["type"] == typ == d_in["type"], f"link {lid}: {s_out['type']} -> {d_in['type']} ({typ})"
        assert d_in["link"] == lid and lid in (s_out["links"] or []), f"link {lid} is not recorded on its nodes"


# The least height (below the title bar) each node takes at load, the largest of frontend 1.49.6
# and 1.58.1, classic canvas and Vue nodes, measured in the real editor (each workflow loaded with
# every node shrunk; Vue nodes grow to their content, the canvas to computeSize()), with the
# number of widgets the node had then: a node whose widgets change must be measured again. A
# smaller size in a file leaves the node's last rows under the node below it.
MEASURED_HEIGHT = {  # type: (widgets incl. control_after_generate, least height)
    "NextStepBackboneLoader": (4, 170), "NextStepFlowHeadLoader": (3, 142), "NextStepVAELoader": (3, 142),
    "NextStepTextToImage": (15, 647), "NextStepEdit": (14, 563), "NextStepStoryStart": (12, 571),
    "NextStepStoryboard": (15, 716), "NextStepStoryboardPanel": (3, 183),
    "NextStepServer": (3, 230), "SaveImage": (1, 70), "LoadImage": (2, 326), "Note": (1, 88),
}


def test_nodes_are_tall_enough_for_their_widgets(pack, workflow):
    """No widget is hidden at load: every node is at least as tall as the editor makes it."""
    for n in load(workflow)["nodes"]:
        widgets, least = MEASURED_HEIGHT[n["type"]]
        cls = pack.NODE_CLASS_MAPPINGS.get(n["type"])
        if cls is not None:
            assert len(expected_widgets(cls)) == widgets, f"{n['type']} changed its widgets: measure it again"
        assert n["size"][1] >= least, \
            f"{workflow.name}: node {n['id']} ({n['type']}) is {n['size'][1]} high; it needs {least}"


def box(node):
    """(left, top, right, bottom) on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def test_workflow_layout(pack, workflow):
    """No node covers or touches another, nor the room a node with a live preview grows into;
    every node lies inside or outside each group (never across its edge); a muted node only feeds
    muted nodes (otherwise the editor queues a node with a missing input)."""
    wf = load(workflow)
    nodes = {n["id"]: n for n in wf["nodes"]}
    boxes = {i: box(n) for i, n in nodes.items()}
    previews = {t for t, cls in pack.NODE_CLASS_MAPPINGS.items() if "unique_id" in cls.INPUT_TYPES().get("hidden", {})}
    for i, n in nodes.items():
        if n["type"] in previews:
            l, t, r, b = boxes[i]
            boxes[i] = (l, t, r, b + PREVIEW_ROOM)
    for i, a in boxes.items():
        assert nodes[i]["mode"] in MODES, f"{workflow.name} node {i}: mode {nodes[i]['mode']}"
        for j, b in boxes.items():
            if i < j:
                g = MIN_GAP
                overlap = a[0] < b[2] + g and b[0] < a[2] + g and a[1] < b[3] + g and b[1] < a[3] + g
                assert not overlap, f"{workflow.name}: nodes {i} and {j} overlap or touch ({a} and {b})"
    for g in wf.get("groups", []):
        gx, gy, gw, gh = g["bounding"]
        for i, (l, t, r, b) in boxes.items():
            inside = gx <= l and r <= gx + gw and gy <= t and b <= gy + gh
            outside = r <= gx or gx + gw <= l or b <= gy or gy + gh <= t
            assert inside or outside, f"{workflow.name}: node {i} lies across the edge of group {g['title']!r}"
    for _lid, src, _slot, dst, _dslot, _typ in wf["links"]:
        if nodes[src]["mode"] == 2:
            assert nodes[dst]["mode"] == 2, f"{workflow.name}: muted node {src} feeds node {dst}, which is not muted"


def test_workflow_has_a_download_note_and_a_thumbnail(workflow):
    notes = [n["widgets_values"][0] for n in load(workflow)["nodes"] if n["type"] in UI_ONLY]
    assert any("https://huggingface.co/stepfun-ai/" in t and "models/nextstep/" in t for t in notes), workflow.name
    thumb = workflow.with_suffix(".jpg")
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and min(im.size) >= 128


def to_api(pack, wf) -> dict:
    """UI graph -> API prompt, as the editor's graphToPrompt does for these nodes."""
    prompt = {}
    links = {l[0]: l for l in wf["links"]}
    for n in wf["nodes"]:
        if n["type"] in UI_ONLY or n.get("mode", 0) in (2, 4):
            continue
        inputs = {}
        values = list(n.get("widgets_values", []))
        if n["type"] in pack.NODE_CLASS_MAPPINGS:
            names = [w for w, _s in expected_widgets(pack.NODE_CLASS_MAPPINGS[n["type"]])]
        else:
            names = CORE[n["type"]][1]
        for name, value in zip(names, values):
            if not name.endswith(".control_after_generate") and name != "upload":
                inputs[name] = value
        for entry in n.get("inputs", []):
            if entry.get("link") is not None:
                _lid, src, slot, *_ = links[entry["link"]]
                inputs[entry["name"]] = [str(src), slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def run_prompt(pack, prompt: dict, overrides: dict = FAST) -> dict:
    """Runs an API prompt in dependency order; core nodes are small stand-ins."""
    done, saved = {}, {}

    def value(v):
        return done[v[0]][v[1]] if isinstance(v, list) else v

    pending = dict(prompt)
    while pending:
        ready = [k for k, n in pending.items()
                 if all(not isinstance(v, list) or v[0] in done for v in n["inputs"].values())]
        assert ready, "the graph has a cycle or a dangling link"
        for k in ready:
            node = pending.pop(k)
            args = {name: value(v) for name, v in node["inputs"].items()}
            t = node["class_type"]
            if t == "LoadImage":
                g = torch.Generator().manual_seed(0)
                done[k] = (torch.rand(1, 96, 80, 3, generator=g), torch.zeros(1, 96, 80))
            elif t in ("SaveImage", "PreviewImage"):
                saved[k] = args["images"]
                done[k] = ()
            else:
                cls = pack.NODE_CLASS_MAPPINGS[t]
                if hasattr(cls, "VALIDATE_INPUTS"):
                    wanted = inspect.getfullargspec(cls.VALIDATE_INPUTS).args[1:]
                    ok = cls.VALIDATE_INPUTS(**{a: args.get(a) for a in wanted})
                    assert ok is True, f"{t}: {ok}"
                args.update({a: v for a, v in overrides.items() if a in args})
                if "unique_id" in cls.INPUT_TYPES().get("hidden", {}):
                    args["unique_id"] = k
                out = getattr(cls(), cls.FUNCTION)(**args)
                done[k] = out["result"] if isinstance(out, dict) else out
    return saved


def test_workflow_runs_on_tiny_checkpoints(pack, host, workflow):
    prompt = to_api(pack, load(workflow))
    with StandIn() as server:  # the server example draws on a stand-in vLLM-Omni (tests/vllm_stand_in.py)
        saved = run_prompt(pack, prompt, {**FAST, "servers": server.url})
    assert saved, "the workflow saves nothing"
    for images in saved.values():
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == torch.float32


def storyboard_parts(wf):
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    by_type = {t: [n for n in wf["nodes"] if n["type"] == t] for t in STORY_NODES}
    (start,), (single,) = by_type["NextStepStoryStart"], by_type["NextStepStoryboard"]
    chain, node = [], start
    while True:  # follow the story sockets from Story Start
        out = next(o for o in node["outputs"] if o["type"] == "NEXTSTEP_STORY")
        nxt = [nodes[links[lid][3]] for lid in out["links"] or []]
        if not nxt:
            break
        (node,) = nxt
        chain.append(node)
    assert {n["id"] for n in chain} == {n["id"] for n in by_type["NextStepStoryboardPanel"]}
    return nodes, links, start, chain, single


def test_storyboard_example_shows_the_chain_and_the_single_node():
    wf = load(ROOT / "workflows" / "nextstep_storyboard.json")
    _nodes, _links, start, chain, single = storyboard_parts(wf)
    assert len(chain) == 4
    seed = single["widgets_values"][-2]
    assert [p["widgets_values"][1:] for p in chain] == [[seed + i, "fixed"] for i in range(4)]
    assert single["widgets_values"][-1] == "fixed"
    assert single["widgets_values"][0].splitlines() == [p["widgets_values"][0] for p in chain]
    assert single["widgets_values"][1:-2] == start["widgets_values"]  # style .. mode: the same settings
    assert single["mode"] == 2 and all(n["mode"] == 0 for n in [start] + chain)


def test_storyboard_example_chain_equals_the_single_node(pack, host):
    """Run with the muted single node switched on: the four saved panels and its batch match."""
    wf = load(ROOT / "workflows" / "nextstep_storyboard.json")
    nodes, links, _start, chain, single = storyboard_parts(wf)
    for n in wf["nodes"]:
        n["mode"] = 0
    saved = run_prompt(pack, to_api(pack, wf))
    save_of = {src: dst for _lid, src, _s, dst, _d, typ in links.values()
               if typ == "IMAGE" and nodes[dst]["type"] in ("SaveImage", "PreviewImage")}
    panels = torch.cat([saved[str(save_of[p["id"]])] for p in chain])
    board = saved[str(save_of[single["id"]])]
    assert board.shape == panels.shape == (4, FAST["height"], FAST["width"], 3)
    assert_images_close(board, panels)
