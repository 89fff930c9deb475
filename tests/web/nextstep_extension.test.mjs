// web/nextstep.js against a fake frontend (tests/web/fake_comfy.mjs), every feature in both modes:
// the classic canvas and Vue nodes (which never draw on the canvas, call only the widget's
// callback, and hide widgets by options.hidden). Saved workflows and queued prompts stay those of
// the plain nodes; progress and reasoning handling; listener clean-up; no deprecated input.link
// reads; and a failure leaves the plain widgets.
import { test, beforeEach } from "node:test";
import assert from "node:assert/strict";

import { deprecations, FakeApi, FakeApp, FakeFrontend, SPECS, installDocument, makeNode } from "./fake_comfy.mjs";

installDocument();
const app = new FakeApp();
const api = new FakeApi();
globalThis.window = { comfyAPI: { app: { app }, api: { api } } };
await import("../../web/nextstep.js");
const ext = app.extensions.find((e) => e.name === "nextstep.ui");

const warnings = [];
console.warn = (...args) => warnings.push(args.map(String).join(" "));

const MODES = ["classic", "vue"];
const plainNames = (name) => SPECS[name].map(([n]) => n);
const plainValues = (name) => SPECS[name].map(([, v]) => v);
const ui = (node) => node.nextstepUI;
const byName = (node, name) => node.widgets.find((w) => w.name === name);
const sizeLine = (node) => ui(node).status.sizeLine.textContent;
const runLine = (node) => ui(node).status.runLine.textContent;

beforeEach(() => {
  warnings.length = 0;
});

test("the extension registers as nextstep.ui and sets up its style once", () => {
  assert.ok(ext, "registered");
  ext.setup();
  ext.setup();
  assert.equal(document.head.children.filter((c) => c.id === "nextstep-ui-style").length, 1);
});

test("it leaves other nodes alone", () => {
  class Other {}
  ext.beforeRegisterNodeDef(Other, { name: "KSampler" });
  assert.deepEqual(Object.getOwnPropertyNames(Other.prototype), ["constructor"]);
});

for (const name of Object.keys(SPECS)) {
  test(`${name}: added widgets come after the node's own and are never saved or queued`, () => {
    const node = makeNode(ext, app, name);
    assert.deepEqual(node.widgets.slice(0, SPECS[name].length).map((w) => w.name), plainNames(name));
    const added = node.widgets.slice(SPECS[name].length);
    assert.ok(added.length >= 1);
    for (const w of added) {
      assert.equal(w.serialize, false, w.name);
      assert.equal(w.options.serialize, false, w.name);
    }
    assert.deepEqual(node.widgetsValues(), plainValues(name), "widgets_values as without the extension");
    assert.deepEqual(Object.keys(node.promptInputs()), plainNames(name), "prompt inputs as without it");
    node.onRemoved();
  });
}

for (const mode of MODES) {
  const fe = new FakeFrontend(mode);

  test(`${mode}: aspect presets set width and height; the base keeps the bucket`, () => {
    const node = makeNode(ext, app, "NextStepTextToImage");
    const aspect = byName(node, "nextstep_aspect");
    const base = byName(node, "nextstep_base");
    assert.equal(aspect.value, "512×512 (1:1)");
    assert.equal(base.value, "512");
    assert.equal(aspect.options.values.length, 18);
    fe.set(node, "nextstep_aspect", "1024×256 (4:1)");
    assert.equal(byName(node, "width").value, 1024);
    assert.equal(byName(node, "height").value, 256);
    assert.equal(sizeLine(node), "1024×256 · 64×16 grid · 1,024 tokens");
    fe.set(node, "nextstep_base", "1024");
    assert.equal(byName(node, "width").value, 2048, "4:1 at base 1024");
    assert.equal(byName(node, "height").value, 512);
    assert.equal(node.properties.nextstep_base, 1024, "the base is kept in properties");
    assert.equal(aspect.value, "2048×512 (4:1)");
    assert.ok(!aspect.options.values.includes("1024×256 (4:1)"));
    fe.set(node, "nextstep_base", "256");
    assert.equal(aspect.value, "512×128 (4:1)");
    fe.set(node, "nextstep_base", "512");
    assert.equal(node.properties.nextstep_base, undefined, "the default base leaves no property behind");
    node.onRemoved();
  });

  test(`${mode}: typed sizes snap to 16 and the cost line and aspect follow at once`, () => {
    const node = makeNode(ext, app, "NextStepTextToImage");
    fe.set(node, "nextstep_aspect", "1024×256 (4:1)");
    fe.set(node, "width", 1000);
    assert.equal(byName(node, "width").value, 1008);
    assert.equal(byName(node, "nextstep_aspect").value, "custom");
    assert.equal(sizeLine(node), "1008×256 · 63×16 grid · 1,008 tokens · not a training bucket");
    byName(node, "width").options.round16 = false;
    fe.set(node, "width", 7);
    assert.equal(byName(node, "width").value, 16, "snapped up to the smallest size");
    fe.set(node, "width", 64);
    fe.set(node, "height", 64);
    assert.equal(byName(node, "nextstep_aspect").value, "custom", "64×64 is no bucket at any base");
    assert.equal(sizeLine(node), "64×64 · 4×4 grid · 16 tokens · not a training bucket");
    fe.set(node, "width", 608);
    fe.set(node, "height", 416);
    assert.equal(byName(node, "nextstep_aspect").value, "608×416 (≈3:2)", "a bucket size selects its preset");
    fe.set(node, "batch_size", 4);
    assert.match(sizeLine(node), /988 tokens × 4 images = 3,952$/);
    fe.connect(node, "width");
    assert.equal(sizeLine(node), "size comes from a linked input");
    fe.connect(node, "width", null);
    assert.match(sizeLine(node), /^608×416/, "unlinked again");
    node.onRemoved();
  });

  test(`${mode}: a loaded workflow shows its preset at the saved base`, () => {
    const node = makeNode(ext, app, "NextStepTextToImage");
    fe.configure(node, { values: { width: 2048, height: 512 }, properties: { nextstep_base: 1024 } });
    assert.equal(byName(node, "nextstep_base").value, "1024");
    assert.equal(byName(node, "nextstep_aspect").value, "2048×512 (4:1)");
    assert.ok(byName(node, "nextstep_aspect").options.values.includes("2048×512 (4:1)"));
    assert.equal(sizeLine(node), "2048×512 · 128×32 grid · 4,096 tokens");
    fe.configure(node, { values: { width: 512, height: 512 } });
    assert.equal(byName(node, "nextstep_base").value, "512", "a size that is only a bucket at 512 switches the base");
    assert.ok(byName(node, "nextstep_aspect").options.values.includes("1024×256 (4:1)"));
    node.onRemoved();
  });

  test(`${mode}: presets the widgets cannot take are not offered`, () => {
    const spec = SPECS.NextStepTextToImage.map(([n, v, o]) => (n === "width" ? [n, v, { ...o, max: 1024 }] : [n, v, o]));
    const node = makeNode(ext, app, "NextStepTextToImage", spec);
    fe.set(node, "nextstep_base", "1024");
    const values = byName(node, "nextstep_aspect").options.values;
    assert.ok(values.includes("1024×1024 (1:1)"));
    assert.ok(!values.includes("2048×512 (4:1)"));
    assert.ok(values.every((v) => v === "custom" || Number(v.split("×")[0]) <= 1024));
    node.onRemoved();
  });

  test(`${mode}: edit says what will be drawn: the rule, then the last input's fitted size`, () => {
    const node = makeNode(ext, app, "NextStepEdit");
    assert.equal(byName(node, "nextstep_aspect"), undefined, "no width/height presets on the edit node");
    assert.equal(sizeLine(node), "≈512×512 at the input's aspect · ≈1,024 tokens");
    fe.set(node, "size", 770);
    assert.equal(byName(node, "size").value, 768);
    assert.equal(sizeLine(node), "≈768×768 at the input's aspect · ≈2,304 tokens");
    fe.set(node, "size", 512);
    node.onExecuted({ fitted: [544, 480, 1] }); // a 64x64 or a 4000x3500 input: both fitted at 512
    assert.equal(sizeLine(node), "last input → 544×480 · 34×30 grid · 1,020 tokens");
    node.onExecuted({ fitted: [512, 512, 3] });
    assert.equal(sizeLine(node), "last input → 512×512 · 32×32 grid · 1,024 tokens × 3 images = 3,072");
    fe.set(node, "size", 256);
    assert.equal(sizeLine(node), "≈256×256 at the input's aspect · ≈256 tokens", "another size: the rule again");
    fe.set(node, "size", 512);
    assert.match(sizeLine(node), /^last input → 512×512/, "back at the size it ran with");
    fe.set(node, "fit", "center-crop");
    assert.equal(sizeLine(node), "512×512, the centre square of the input · 1,024 tokens");
    fe.set(node, "fit", "none");
    assert.equal(sizeLine(node), "the input's own size (its sides must be multiples of 16)");
    assert.ok(!/follows the input/.test(sizeLine(node)));
    node.onRemoved();
  });

  test(`${mode}: story start: aspect presets, snapping, the cost per panel, and no run line`, () => {
    const before = api.live;
    const node = makeNode(ext, app, "NextStepStoryStart");
    assert.equal(api.live, before, "nothing to listen to: the node samples nothing");
    const aspect = byName(node, "nextstep_aspect");
    assert.equal(aspect.value, "512×512 (1:1)");
    assert.equal(aspect.options.values.length, 18);
    assert.equal(sizeLine(node), "512×512 · 32×32 grid · 1,024 tokens per panel");
    fe.set(node, "nextstep_aspect", "672×384 (≈16:9)");
    assert.equal(byName(node, "width").value, 672);
    assert.equal(byName(node, "height").value, 384);
    fe.set(node, "nextstep_base", "1024");
    assert.equal(byName(node, "width").value, 1344, "the base keeps the bucket");
    assert.equal(node.properties.nextstep_base, 1024);
    fe.set(node, "height", 790);
    assert.equal(byName(node, "height").value, 784, "snapped to 16");
    assert.equal(aspect.value, "custom");
    assert.equal(sizeLine(node), "1344×784 · 84×49 grid · 4,116 tokens per panel · not a training bucket");
    const box = byName(node, "nextstep_status").element;
    assert.deepEqual(box.children, [ui(node).status.sizeLine], "only the size line");
    node.onRemoved();
  });

  test(`${mode}: Self-CoT reasoning is shown after a run and kept in node.properties`, () => {
    const node = makeNode(ext, app, "NextStepTextToImage");
    const box = () => byName(node, "nextstep_reasoning");
    assert.equal(fe.shown(node, box()), false, "not there until there is reasoning");
    node.onExecuted({ reasoning: ["A fox, low sun, river on the left."] });
    assert.equal(fe.shown(node, box()), true);
    const names = node.widgets.map((w) => w.name);
    assert.equal(names.indexOf("nextstep_reasoning"), names.indexOf("nextstep_status") + 1, "right under the status line");
    assert.equal(node.properties.nextstep_reasoning, "A fox, low sun, river on the left.");
    assert.deepEqual(node.widgetsValues(), plainValues("NextStepTextToImage"), "still not saved");
    const textarea = box().element.querySelector("textarea");
    assert.equal(textarea.value, "A fox, low sun, river on the left.");
    assert.equal(textarea.readOnly, true);
    node.onExecuted({ images: [] });
    assert.equal(node.properties.nextstep_reasoning, "A fox, low sun, river on the left.", "other outputs keep it");
    assert.equal(fe.shown(node, box()), true);
    node.onExecuted({ reasoning: [""] });
    assert.equal(node.properties.nextstep_reasoning, undefined, "a run without reasoning clears it");
    assert.equal(fe.shown(node, box()), false);
    node.onExecuted({ reasoning: ["again"] });
    assert.equal(fe.shown(node, box()), true, "and a later run shows it again");
    assert.equal(box().element.querySelector("textarea").value, "again");
    node.onRemoved();
  });

  test(`${mode}: reasoning saved in a workflow comes back when it is loaded`, () => {
    const node = makeNode(ext, app, "NextStepTextToImage");
    fe.configure(node, { properties: { nextstep_reasoning: "saved reasoning" } });
    assert.equal(fe.shown(node, byName(node, "nextstep_reasoning")), true);
    assert.equal(byName(node, "nextstep_reasoning").element.querySelector("textarea").value, "saved reasoning");
    node.onRemoved();
  });

  test(`${mode}: storyboard: the panel editor edits the node's own panels text`, () => {
    const node = makeNode(ext, app, "NextStepStoryboard");
    const raw = byName(node, "panels");
    assert.equal(fe.shown(node, raw), false, "the plain text widget is folded away");
    const { list, box } = ui(node).panels;
    const inputs = () => list.all("input");
    assert.deepEqual(inputs().map((i) => i.value), ["a fox wakes up", "a fox walks to the river"]);
    assert.match(sizeLine(node), /× 2 panels = 2,048$/);

    const first = inputs()[0];
    first.value = "a fox wakes up at dawn";
    first.fire("input");
    assert.equal(raw.value, "a fox wakes up at dawn\na fox walks to the river");

    const buttons = (row) => list.children[row].all("button");
    buttons(1)[0].fire("click"); // move row 2 up
    assert.equal(raw.value, "a fox walks to the river\na fox wakes up at dawn");

    const foot = box.children[1];
    foot.all("button")[0].fire("click"); // + panel
    assert.equal(inputs().length, 3);
    assert.equal(raw.value, "a fox walks to the river\na fox wakes up at dawn", "an empty row writes nothing");
    const third = inputs()[2];
    third.value = "the fox sleeps";
    third.fire("input");
    assert.equal(raw.value.split("\n").length, 3);
    assert.match(sizeLine(node), /× 3 panels = 3,072$/, "the cost follows the rows");

    const second = inputs()[1];
    second.selectionStart = second.selectionEnd = second.value.length;
    const prevented = second.fire("paste", { clipboardData: { getData: () => " - x\ny\nz" } });
    assert.ok(prevented);
    assert.deepEqual(raw.value.split("\n"), [
      "a fox walks to the river", "a fox wakes up at dawn - x", "y", "z", "the fox sleeps",
    ]);

    buttons(0)[2].fire("click"); // remove row 1
    assert.equal(raw.value.split("\n")[0], "a fox wakes up at dawn - x");
    const { textBox } = ui(node).panels;
    assert.equal(textBox.style.display, "none");
    foot.all("button")[1].fire("click"); // text
    assert.equal(textBox.style.display, "", "the plain text opens inside the editor");
    assert.equal(textBox.value, raw.value);
    textBox.value = "one\ntwo";
    textBox.fire("input");
    assert.equal(raw.value, "one\ntwo", "and edits the node's text");
    assert.deepEqual(inputs().map((i) => i.value), ["one", "two"], "the rows follow");
    assert.match(sizeLine(node), /× 2 panels/);
    inputs()[0].value = "one fox";
    inputs()[0].fire("input");
    assert.equal(textBox.value, "one fox\ntwo", "and the text follows the rows");
    foot.all("button")[1].fire("click");
    assert.equal(textBox.style.display, "none");
    assert.equal(fe.shown(node, raw), false, "the folded widget stays folded");
    node.onRemoved();
  });

  test(`${mode}: storyboard: Enter splits a row, Backspace on an empty row removes it`, () => {
    const node = makeNode(ext, app, "NextStepStoryboard");
    const raw = byName(node, "panels");
    const { list } = ui(node).panels;
    const row0 = list.all("input")[0];
    row0.selectionStart = row0.selectionEnd = 5;
    row0.fire("keydown", { key: "Enter" });
    assert.deepEqual(list.all("input").map((i) => i.value), ["a fox", " wakes up", "a fox walks to the river"]);
    assert.equal(document.activeElement, list.all("input")[1]);
    fe.draw(node);
    assert.equal(document.activeElement, list.all("input")[1], "a redraw does not rebuild the rows under the caret");
    const row1 = list.all("input")[1];
    row1.value = "";
    row1.fire("input");
    row1.fire("keydown", { key: "Backspace" });
    assert.deepEqual(list.all("input").map((i) => i.value), ["a fox", "a fox walks to the river"]);
    assert.equal(raw.value, "a fox\na fox walks to the river");
    node.onRemoved();
  });

  test(`${mode}: storyboard: text changed elsewhere (plain widget, undo, load) re-reads the rows`, () => {
    const node = makeNode(ext, app, "NextStepStoryboard");
    document.activeElement = null;
    fe.set(node, "panels", "one\n\ntwo\nthree");
    assert.deepEqual(ui(node).panels.list.all("input").map((i) => i.value), ["one", "two", "three"]);
    assert.equal(byName(node, "panels").value, "one\n\ntwo\nthree", "reading never rewrites the text");
    assert.match(sizeLine(node), /× 3 panels/);
    fe.configure(node, { values: { panels: "a\nb" } });
    assert.deepEqual(ui(node).panels.list.all("input").map((i) => i.value), ["a", "b"]);
    fe.connect(node, "panels");
    assert.ok(ui(node).panels.box.classList.contains("ns-linked"));
    assert.equal(ui(node).panels.note.textContent, "panels come from a linked input");
    node.onRemoved();
  });

  test(`${mode}: storyboard: the status line counts panels and the ETA covers the panels still to come`, (t) => {
    let clock = 0;
    t.mock.method(performance, "now", () => clock);
    const node = makeNode(ext, app, "NextStepStoryboard");
    fe.set(node, "panels", "one\n\ntwo\n  \nthree");
    const id = String(node.id);
    const token = (v) => {
      clock += 100;
      api.send("progress", { value: v, max: 100, node: id });
    };
    api.send("executing", id);
    fe.set(node, "panels", "one\ntwo\nthree\nfour"); // edits after queueing change nothing
    // 10 tokens per second, 100 tokens per panel, progress restarting for each panel
    for (let v = 1; v <= 50; v++) token(v);
    assert.equal(runLine(node), "panel 1/3 · 50/100 tokens · 10.0 tok/s · ETA 0:25");
    for (let v = 51; v <= 100; v++) token(v);
    clock += 2000; // decoding panel 1, reading panel 2's prompt
    api.send("progress", { value: 1, max: 100, node: id });
    assert.equal(runLine(node), "panel 2/3 · 1/100 tokens · 10.0 tok/s · ETA 0:20");
    clock += 5000;
    ui(node).status.paint(); // the 1 s timer
    assert.equal(runLine(node), "panel 2/3 · 1/100 tokens · 10.0 tok/s · ETA 0:15", "the ETA counts down between messages");
    api.send("execution_interrupted", {});
    assert.equal(runLine(node), "stopped at panel 2/3 · 1/100 tokens");
    assert.equal(ui(node).status.timer, null);

    fe.connect(node, "panels");
    api.send("executing", id);
    for (let v = 1; v <= 100; v++) token(v);
    for (let v = 1; v <= 50; v++) token(v);
    assert.equal(runLine(node), "panel 2 · 50/100 tokens · 10.0 tok/s · panel ETA 0:05", "a linked count is unknown");
    for (let v = 51; v <= 100; v++) token(v);
    api.send("executing", null);
    assert.match(runLine(node), /^done · 2 panels × 100 tokens · 0:\d\d · 10.0 tok\/s$/);
    node.onRemoved();
  });
}

test("storyboard panel: a status line, no size line", () => {
  const node = makeNode(ext, app, "NextStepStoryboardPanel");
  const status = byName(node, "nextstep_status");
  assert.deepEqual(status.element.children, [ui(node).status.runLine], "no (empty) size line");
  assert.equal(status.options.getMinHeight(), 23, "one line high");
  const id = String(node.id);
  api.send("executing", id);
  api.send("progress", { value: 10, max: 1024, node: id });
  api.send("progress", { value: 20, max: 1024, node: id });
  assert.match(runLine(node), /^20\/1,024 tokens · /);
  api.send("executing", null);
  assert.match(runLine(node), /^done · 1,024 tokens · /);
  node.onRemoved();
});

test("the status line follows executing / progress messages and stops with the run", () => {
  const node = makeNode(ext, app, "NextStepTextToImage");
  const id = String(node.id);
  api.send("executing", id);
  assert.match(runLine(node), /^preparing… 0:00/);
  for (let v = 1; v <= 40; v++) api.send("progress", { value: v, max: 1024, node: id, prompt_id: "p" });
  assert.match(runLine(node), /^40\/1,024 tokens · .* tok\/s · ETA /);
  api.send("progress", { value: 41, max: 1024, node: `${id}0`, prompt_id: "p" });
  assert.match(runLine(node), /^40\/1,024/, "other nodes' progress is ignored");
  api.send("progress_state", { prompt_id: "p", nodes: { [id]: { value: 64, max: 1024, state: "running" } } });
  assert.match(runLine(node), /^64\/1,024/, "progress_state works too");
  api.send("execution_interrupted", { prompt_id: "p" });
  assert.equal(runLine(node), "stopped at 64/1,024 tokens");
  assert.equal(ui(node).status.timer, null, "no timer after the run");

  api.send("executing", id);
  api.send("progress", { value: 1024, max: 1024, node: id, prompt_id: "q" });
  api.send("executing", null);
  assert.match(runLine(node), /^done · 1,024 tokens · 0:0\d/);
  node.onRemoved();
});

test("removing a node removes its listeners and timer; re-adding listens again", () => {
  const before = api.live;
  const node = makeNode(ext, app, "NextStepTextToImage");
  assert.ok(api.live > before);
  api.send("executing", String(node.id));
  assert.notEqual(ui(node).status.timer, null);
  node.onRemoved();
  assert.equal(api.live, before);
  assert.equal(ui(node).status.timer, null);
  const text = runLine(node);
  api.send("progress", { value: 5, max: 10, node: String(node.id) });
  assert.equal(runLine(node), text, "a removed node no longer listens");
  node.onAdded();
  assert.ok(api.live > before);
  node.onRemoved();
  assert.equal(api.live, before);
});

test("links are read through node.isInputConnected, never the deprecated input.link", () => {
  // every test above has run by now (node:test runs a file's tests in order), links included
  assert.deepEqual(deprecations, []);
});

test("if setting up a node fails, the node keeps exactly its plain widgets", () => {
  let callbacks;
  const node = makeNode(ext, app, "NextStepStoryboard", undefined, (n) => {
    callbacks = n.widgets.map((w) => w.callback);
    n.addDOMWidget = () => {
      throw new Error("no DOM widgets in this frontend");
    };
  });
  assert.deepEqual(node.widgets.map((w) => w.name), plainNames("NextStepStoryboard"));
  assert.deepEqual(node.widgets.map((w) => w.callback), callbacks, "the widgets' callbacks are restored");
  assert.ok(!byName(node, "panels").hidden && !byName(node, "panels").options.hidden, "the plain panels text stays visible");
  assert.equal(node.nextstepUI, undefined);
  assert.ok(warnings.some((w) => w.includes("could not set up NextStepStoryboard")));
  node.onExecuted({ reasoning: ["x"] }); // the other hooks do nothing
  node.onDrawForeground();
  node.onWidgetChanged("width", 1, 2, {});
  node.onRemoved();
});

test("without the frontend's modules the extension logs and registers nothing", async () => {
  const registered = app.extensions.length;
  globalThis.window = { comfyAPI: undefined }; // and ../../scripts/app.js does not exist here
  await import("../../web/nextstep.js?no-frontend");
  globalThis.window = { comfyAPI: { app: { app }, api: { api } } };
  assert.equal(app.extensions.length, registered);
  assert.ok(warnings.some((w) => w.includes("the extension did not load")));
});
