// web/nextstep.js against a fake frontend (tests/web/fake_comfy.mjs): what it adds to each node,
// that saved workflows and queued prompts stay those of the plain nodes, progress and reasoning
// handling, listener clean-up, and that a failure leaves the plain widgets.
import { test, beforeEach, mock } from "node:test";
import assert from "node:assert/strict";

import { FakeApi, FakeApp, SPECS, installDocument, makeNode } from "./fake_comfy.mjs";

installDocument();
const app = new FakeApp();
const api = new FakeApi();
globalThis.window = { comfyAPI: { app: { app }, api: { api } } };
await import("../../web/nextstep.js");
const ext = app.extensions.find((e) => e.name === "nextstep.ui");

const warnings = [];
console.warn = (...args) => warnings.push(args.map(String).join(" "));

const plainNames = (name) => SPECS[name].map(([n]) => n);
const plainValues = (name) => SPECS[name].map(([, v]) => v);
const ui = (node) => node.nextstepUI;
const byName = (node, name) => node.widgets.find((w) => w.name === name);

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

test("text to image: aspect presets set width and height; the base keeps the bucket", () => {
  const node = makeNode(ext, app, "NextStepTextToImage");
  const aspect = byName(node, "nextstep_aspect");
  const base = byName(node, "nextstep_base");
  assert.equal(aspect.value, "512×512 (1:1)");
  assert.equal(base.value, "512");
  assert.equal(aspect.options.values.length, 18);
  aspect.value = "1024×256 (4:1)";
  aspect.callback(aspect.value);
  assert.equal(byName(node, "width").value, 1024);
  assert.equal(byName(node, "height").value, 256);
  base.value = "1024";
  base.callback("1024");
  assert.equal(byName(node, "width").value, 2048, "4:1 at base 1024");
  assert.equal(byName(node, "height").value, 512);
  assert.equal(node.properties.nextstep_base, 1024, "the base is kept in properties");
  assert.equal(aspect.value, "2048×512 (4:1)");
  assert.ok(!aspect.options.values.includes("1024×256 (4:1)"));
  base.callback("256");
  assert.equal(aspect.value, "512×128 (4:1)");
  base.callback("512");
  assert.equal(node.properties.nextstep_base, undefined, "the default base leaves no property behind");
  node.onRemoved();
});

test("a loaded workflow shows its preset at the saved base", () => {
  const node = makeNode(ext, app, "NextStepTextToImage");
  // what configure() restores from a file saved at base 1024 with the 4:1 preset
  node.properties.nextstep_base = 1024;
  byName(node, "width").value = 2048;
  byName(node, "height").value = 512;
  node.onConfigure({});
  assert.equal(byName(node, "nextstep_base").value, "1024");
  assert.equal(byName(node, "nextstep_aspect").value, "2048×512 (4:1)");
  assert.ok(byName(node, "nextstep_aspect").options.values.includes("2048×512 (4:1)"));
  byName(node, "width").value = 512;
  byName(node, "height").value = 512;
  node.onDrawForeground();
  assert.equal(byName(node, "nextstep_base").value, "512", "a size that is only a bucket at 512 switches the base");
  assert.ok(byName(node, "nextstep_aspect").options.values.includes("1024×256 (4:1)"));
  node.onRemoved();
});

test("presets the widgets cannot take are not offered", () => {
  const spec = SPECS.NextStepTextToImage.map(([n, v, o]) => (n === "width" ? [n, v, { ...o, max: 1024 }] : [n, v, o]));
  const node = makeNode(ext, app, "NextStepTextToImage", spec);
  byName(node, "nextstep_base").callback("1024");
  const values = byName(node, "nextstep_aspect").options.values;
  assert.ok(values.includes("1024×1024 (1:1)"));
  assert.ok(!values.includes("2048×512 (4:1)"));
  assert.ok(values.every((v) => v === "custom" || Number(v.split("×")[0]) <= 1024));
  node.onRemoved();
});

test("width and height snap to multiples of 16 and the token cost follows", () => {
  const node = makeNode(ext, app, "NextStepTextToImage");
  const width = byName(node, "width");
  width.callback(509);
  assert.equal(width.value, 512);
  width.value = 7; // set past the widget's own rounding
  width.callback(7);
  assert.equal(width.value, 16);
  width.callback(590);
  assert.equal(width.value, 592);
  node.onDrawForeground();
  assert.equal(byName(node, "nextstep_aspect").value, "custom");
  assert.equal(ui(node).sizeLine.textContent, "592×512 · 37×32 grid · 1,184 tokens · not a training bucket");
  byName(node, "batch_size").value = 4;
  node.onDrawForeground();
  assert.match(ui(node).sizeLine.textContent, /1,184 tokens × 4 images = 4,736/);
  width.value = 608;
  byName(node, "height").value = 416;
  node.onDrawForeground();
  assert.equal(byName(node, "nextstep_aspect").value, "608×416 (≈3:2)", "a bucket size selects its preset");
  node.inputs.push({ name: "width", link: 3 });
  node.onDrawForeground();
  assert.equal(ui(node).sizeLine.textContent, "size comes from a linked input");
  node.onRemoved();
});

test("edit: the size widget snaps and shows the cost of its base", () => {
  const node = makeNode(ext, app, "NextStepEdit");
  assert.equal(byName(node, "nextstep_aspect"), undefined, "no width/height presets on the edit node");
  const size = byName(node, "size");
  size.callback(770);
  assert.equal(size.value, 768);
  node.onDrawForeground();
  assert.equal(ui(node).sizeLine.textContent, "base 768 · ≈2,304 tokens · output size follows the input image");
  node.onRemoved();
});

test("story start: aspect presets, snapping, the cost per panel, and no run line", () => {
  const before = api.live;
  const node = makeNode(ext, app, "NextStepStoryStart");
  assert.equal(api.live, before, "nothing to listen to: the node samples nothing");
  const aspect = byName(node, "nextstep_aspect");
  assert.equal(aspect.value, "512×512 (1:1)");
  assert.equal(aspect.options.values.length, 18);
  assert.equal(ui(node).sizeLine.textContent, "512×512 · 32×32 grid · 1,024 tokens per panel");
  aspect.callback("672×384 (≈16:9)");
  assert.equal(byName(node, "width").value, 672);
  assert.equal(byName(node, "height").value, 384);
  byName(node, "nextstep_base").callback("1024");
  assert.equal(byName(node, "width").value, 1344, "the base keeps the bucket");
  assert.equal(node.properties.nextstep_base, 1024);
  const height = byName(node, "height");
  height.value = 790;
  height.callback(790);
  assert.equal(height.value, 784, "snapped to 16");
  node.onDrawForeground();
  assert.equal(aspect.value, "custom");
  assert.equal(ui(node).sizeLine.textContent, "1344×784 · 84×49 grid · 4,116 tokens per panel · not a training bucket");
  const box = byName(node, "nextstep_status").element;
  assert.deepEqual(box.children, [ui(node).sizeLine], "only the size line");
  node.onRemoved();
});

test("storyboard panel: a status line, no size line", () => {
  const node = makeNode(ext, app, "NextStepStoryboardPanel");
  const status = byName(node, "nextstep_status");
  assert.deepEqual(status.element.children, [ui(node).runLine], "no (empty) size line");
  assert.equal(status.options.getMinHeight(), 23, "one line high");
  const id = String(node.id);
  api.send("executing", id);
  api.send("progress", { value: 10, max: 1024, node: id });
  api.send("progress", { value: 20, max: 1024, node: id });
  assert.match(ui(node).runLine.textContent, /^20\/1,024 tokens · /);
  api.send("executing", null);
  assert.match(ui(node).runLine.textContent, /^done · 1,024 tokens · /);
  node.onRemoved();
});

test("storyboard: the status line counts panels and the ETA covers the panels still to come", (t) => {
  let clock = 0;
  t.mock.method(performance, "now", () => clock);
  const node = makeNode(ext, app, "NextStepStoryboard");
  byName(node, "panels").value = "one\n\ntwo\n  \nthree";
  node.onDrawForeground();
  const id = String(node.id);
  const line = () => ui(node).runLine.textContent;
  const token = (v) => {
    clock += 100;
    api.send("progress", { value: v, max: 100, node: id });
  };
  api.send("executing", id);
  byName(node, "panels").value = "one\ntwo\nthree\nfour"; // edits after queueing change nothing
  // 10 tokens per second, 100 tokens per panel, progress restarting for each panel
  for (let v = 1; v <= 50; v++) token(v);
  assert.equal(line(), "panel 1/3 · 50/100 tokens · 10.0 tok/s · ETA 0:25");
  for (let v = 51; v <= 100; v++) token(v);
  clock += 2000; // decoding panel 1, reading panel 2's prompt
  api.send("progress", { value: 1, max: 100, node: id });
  assert.equal(line(), "panel 2/3 · 1/100 tokens · 10.0 tok/s · ETA 0:20");
  clock += 5000;
  ui(node).paintStatus(); // the 1 s timer
  assert.equal(line(), "panel 2/3 · 1/100 tokens · 10.0 tok/s · ETA 0:15", "the ETA counts down between messages");
  api.send("execution_interrupted", {});
  assert.equal(line(), "stopped at panel 2/3 · 1/100 tokens");
  assert.equal(ui(node).timer, null);

  node.inputs.push({ name: "panels", link: 4 });
  api.send("executing", id);
  for (let v = 1; v <= 100; v++) token(v);
  for (let v = 1; v <= 50; v++) token(v);
  assert.equal(line(), "panel 2 · 50/100 tokens · 10.0 tok/s · panel ETA 0:05", "a linked count is unknown");
  for (let v = 51; v <= 100; v++) token(v);
  api.send("executing", null);
  assert.match(line(), /^done · 2 panels × 100 tokens · 0:\d\d · 10.0 tok\/s$/);
  node.onRemoved();
});

test("the status line follows executing / progress messages and stops with the run", () => {
  const node = makeNode(ext, app, "NextStepTextToImage");
  const id = String(node.id);
  api.send("executing", id);
  assert.match(ui(node).runLine.textContent, /^preparing… 0:00/);
  for (let v = 1; v <= 40; v++) api.send("progress", { value: v, max: 1024, node: id, prompt_id: "p" });
  assert.match(ui(node).runLine.textContent, /^40\/1,024 tokens · .* tok\/s · ETA /);
  api.send("progress", { value: 41, max: 1024, node: `${id}0`, prompt_id: "p" });
  assert.match(ui(node).runLine.textContent, /^40\/1,024/, "other nodes' progress is ignored");
  api.send("progress_state", { prompt_id: "p", nodes: { [id]: { value: 64, max: 1024, state: "running" } } });
  assert.match(ui(node).runLine.textContent, /^64\/1,024/, "progress_state works too");
  api.send("execution_interrupted", { prompt_id: "p" });
  assert.equal(ui(node).runLine.textContent, "stopped at 64/1,024 tokens");
  assert.equal(ui(node).timer, null, "no timer after the run");

  api.send("executing", id);
  api.send("progress", { value: 1024, max: 1024, node: id, prompt_id: "q" });
  api.send("executing", null);
  assert.match(ui(node).runLine.textContent, /^done · 1,024 tokens · 0:0\d/);
  node.onRemoved();
});

test("removing a node removes its listeners and timer; re-adding listens again", () => {
  const before = api.live;
  const node = makeNode(ext, app, "NextStepTextToImage");
  assert.ok(api.live > before);
  api.send("executing", String(node.id));
  assert.notEqual(ui(node).timer, null);
  node.onRemoved();
  assert.equal(api.live, before);
  assert.equal(ui(node).timer, null);
  const text = ui(node).runLine.textContent;
  api.send("progress", { value: 5, max: 10, node: String(node.id) });
  assert.equal(ui(node).runLine.textContent, text, "a removed node no longer listens");
  node.onAdded();
  assert.ok(api.live > before);
  node.onRemoved();
  assert.equal(api.live, before);
});

test("Self-CoT reasoning is shown after a run and kept in node.properties", () => {
  const node = makeNode(ext, app, "NextStepTextToImage");
  const box = byName(node, "nextstep_reasoning");
  assert.equal(box.hidden, true, "hidden until there is reasoning");
  node.onExecuted({ reasoning: ["A fox, low sun, river on the left."] });
  assert.equal(box.hidden, false);
  assert.equal(node.properties.nextstep_reasoning, "A fox, low sun, river on the left.");
  const textarea = box.element.querySelector("textarea");
  assert.equal(textarea.value, "A fox, low sun, river on the left.");
  assert.equal(textarea.readOnly, true);
  node.onExecuted({ images: [] });
  assert.equal(node.properties.nextstep_reasoning, "A fox, low sun, river on the left.", "other outputs keep it");
  node.onExecuted({ reasoning: [""] });
  assert.equal(node.properties.nextstep_reasoning, undefined, "a run without reasoning clears it");
  assert.equal(box.hidden, true);
  node.onRemoved();
});

test("reasoning saved in a workflow comes back when it is loaded", () => {
  const node = makeNode(ext, app, "NextStepTextToImage");
  node.properties.nextstep_reasoning = "saved reasoning"; // what configure() restores from the file
  node.onConfigure({});
  assert.equal(byName(node, "nextstep_reasoning").hidden, false);
  assert.equal(byName(node, "nextstep_reasoning").element.querySelector("textarea").value, "saved reasoning");
  node.onRemoved();
});

test("storyboard: the panel editor edits the node's own panels text", () => {
  const node = makeNode(ext, app, "NextStepStoryboard");
  const raw = byName(node, "panels");
  assert.equal(raw.hidden, true, "the plain text widget is folded away");
  const list = ui(node).panelList;
  const inputs = () => list.all("input");
  assert.deepEqual(inputs().map((i) => i.value), ["a fox wakes up", "a fox walks to the river"]);
  assert.match(ui(node).sizeLine.textContent, /× 2 panels = 2,048$/);

  const first = inputs()[0];
  first.value = "a fox wakes up at dawn";
  first.fire("input");
  assert.equal(raw.value, "a fox wakes up at dawn\na fox walks to the river");

  const buttons = (row) => list.children[row].all("button");
  buttons(1)[0].fire("click"); // move row 2 up
  assert.equal(raw.value, "a fox walks to the river\na fox wakes up at dawn");

  const foot = ui(node).panelBox.children[1];
  foot.all("button")[0].fire("click"); // + panel
  assert.equal(inputs().length, 3);
  assert.equal(raw.value, "a fox walks to the river\na fox wakes up at dawn", "an empty row writes nothing");
  const third = inputs()[2];
  third.value = "the fox sleeps";
  third.fire("input");
  assert.equal(raw.value.split("\n").length, 3);

  const second = inputs()[1];
  second.selectionStart = second.selectionEnd = second.value.length;
  const prevented = second.fire("paste", { clipboardData: { getData: () => " - x\ny\nz" } });
  assert.ok(prevented);
  assert.deepEqual(raw.value.split("\n"), [
    "a fox walks to the river", "a fox wakes up at dawn - x", "y", "z", "the fox sleeps",
  ]);

  buttons(0)[2].fire("click"); // remove row 1
  assert.equal(raw.value.split("\n")[0], "a fox wakes up at dawn - x");
  node.onRemoved();
});

test("storyboard: Enter splits a row, Backspace on an empty row removes it", () => {
  const node = makeNode(ext, app, "NextStepStoryboard");
  const raw = byName(node, "panels");
  const list = ui(node).panelList;
  const row0 = list.all("input")[0];
  row0.selectionStart = row0.selectionEnd = 5;
  row0.fire("keydown", { key: "Enter" });
  assert.deepEqual(list.all("input").map((i) => i.value), ["a fox", " wakes up", "a fox walks to the river"]);
  assert.equal(document.activeElement, list.all("input")[1]);
  node.onDrawForeground();
  assert.equal(document.activeElement, list.all("input")[1], "a redraw does not rebuild the rows under the caret");
  const row1 = list.all("input")[1];
  row1.value = "";
  row1.fire("input");
  row1.fire("keydown", { key: "Backspace" });
  assert.deepEqual(list.all("input").map((i) => i.value), ["a fox", "a fox walks to the river"]);
  assert.equal(raw.value, "a fox\na fox walks to the river");
  node.onRemoved();
});

test("storyboard: text changed elsewhere (plain widget, undo, load) re-reads the rows", () => {
  const node = makeNode(ext, app, "NextStepStoryboard");
  document.activeElement = null;
  byName(node, "panels").value = "one\n\ntwo\nthree";
  node.onDrawForeground();
  assert.deepEqual(ui(node).panelList.all("input").map((i) => i.value), ["one", "two", "three"]);
  assert.equal(byName(node, "panels").value, "one\n\ntwo\nthree", "reading never rewrites the text");
  node.inputs.push({ name: "panels", link: 9 });
  node.onConnectionsChange();
  assert.ok(ui(node).panelBox.classList.contains("ns-linked"));
  node.onRemoved();
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
  assert.deepEqual(node.widgets.map((w) => w.callback), callbacks, "the size widgets' callbacks are restored");
  assert.ok(!byName(node, "panels").hidden, "the plain panels text stays visible");
  assert.equal(node.nextstepUI, undefined);
  assert.ok(warnings.some((w) => w.includes("could not set up NextStepStoryboard")));
  node.onExecuted({ reasoning: ["x"] }); // the other hooks do nothing
  node.onDrawForeground();
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
