// ComfyUI graph-editor extension for the NextStep nodes:
//  - aspect presets (the official training buckets) that set width/height, width/height snapped
//    to multiples of 16, and the image-token cost of the size shown under the widgets;
//  - a live status line while a NextStep node runs: tokens done/total, tokens/s, ETA (on the
//    storyboard node also the panel it draws, and an ETA for all its panels);
//  - the Self-CoT reasoning of the last run on the text-to-image node (selectable, copyable,
//    saved with the workflow in node.properties);
//  - a storyboard panel editor (one row per panel) that writes the node's own `panels` text.
// Everything it adds is left out of widgets_values and of the queued prompt, so workflows saved
// with it load unchanged without it; if anything here fails, the nodes keep their plain widgets.
import * as L from "./nextstep_logic.js";

const EXTENSION = "nextstep.ui";
const TAG = "[NextStep]";

// What each node gets. size: "wh" (width/height + aspect presets) or "base" (the edit node's
// base-size hint), none for a node without a size line; count: the widget whose value multiplies
// the token cost; per: the cost is shown "per <per>" (Story Start cannot know how many panels
// follow it); run: false for a node without a run line (Story Start samples nothing).
const KINDS = {
  NextStepTextToImage: { size: "wh", count: "batch_size", unit: "images", reasoning: true },
  NextStepEdit: { size: "base" },
  NextStepStoryboard: { size: "wh", panels: true, unit: "panels" },
  NextStepStoryStart: { size: "wh", per: "panel", run: false },
  NextStepStoryboardPanel: {},
};

const PROP_REASONING = "nextstep_reasoning";
const PROP_BASE = "nextstep_base";

function warn(what, err) {
  console.warn(`${TAG} ${what}; the node keeps its plain widgets.`, err);
}

async function comfy() {
  let app = window.comfyAPI?.app?.app;
  let api = window.comfyAPI?.api?.api;
  if (!app) app = (await import("../../scripts/app.js")).app;
  if (!api) api = (await import("../../scripts/api.js")).api;
  return { app, api };
}

/** Calls the original prototype method first, then `fn`; an error in `fn` is logged, never thrown. */
function chain(proto, method, fn) {
  const original = proto[method];
  proto[method] = function (...args) {
    const result = original?.apply(this, args);
    try {
      fn.apply(this, args);
    } catch (err) {
      warn(`${method} failed`, err);
    }
    return result;
  };
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

const STYLE = `
.nextstep-status { font: 12px/1.45 system-ui, sans-serif; color: var(--descrip-text, #999);
  padding: 2px 4px; overflow: hidden; box-sizing: border-box; }
.nextstep-status .ns-run { color: var(--input-text, #ddd); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.nextstep-status .ns-size { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.nextstep-reasoning { display: flex; flex-direction: column; gap: 3px; height: 100%;
  box-sizing: border-box; font: 12px system-ui, sans-serif; color: var(--descrip-text, #999); }
.nextstep-reasoning .ns-head { display: flex; justify-content: space-between; align-items: center; }
.nextstep-reasoning textarea { flex: 1; min-height: 60px; resize: none; box-sizing: border-box;
  width: 100%; font: 12px/1.4 ui-monospace, monospace; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444);
  border-radius: 4px; padding: 4px 6px; user-select: text; }
.nextstep-panels { display: flex; flex-direction: column; gap: 3px; box-sizing: border-box;
  font: 12px system-ui, sans-serif; color: var(--descrip-text, #999); }
.nextstep-panels .ns-row { display: flex; gap: 3px; align-items: center; }
.nextstep-panels .ns-idx { width: 18px; text-align: right; flex: none; }
.nextstep-panels input { flex: 1; min-width: 0; height: 22px; box-sizing: border-box;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 4px; padding: 0 6px; font: inherit; }
.nextstep-panels .ns-foot { display: flex; gap: 4px; align-items: center; }
.nextstep-panels .ns-foot .ns-note { flex: 1; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }
.nextstep-ui button { flex: none; height: 22px; min-width: 22px; padding: 0 6px; cursor: pointer;
  color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222); font: inherit;
  border: 1px solid var(--border-color, #444); border-radius: 4px; }
.nextstep-ui button:hover:not(:disabled) { border-color: var(--input-text, #ddd); }
.nextstep-ui button:disabled { opacity: 0.4; cursor: default; }
.nextstep-panels.ns-linked .ns-row { opacity: 0.5; pointer-events: none; }
`;

function injectStyle() {
  if (document.getElementById("nextstep-ui-style")) return;
  const style = el("style");
  style.id = "nextstep-ui-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

/** A DOM widget that is never saved in widgets_values nor sent with the prompt. */
function addPanelWidget(node, name, element, options) {
  element.classList.add("nextstep-ui");
  const w = node.addDOMWidget(name, "nextstep", element, { serialize: false, hideOnZoom: false, ...options });
  w.serialize = false;
  w.options.serialize = false;
  return w;
}

/** A canvas combo that is never saved in widgets_values nor sent with the prompt. */
function addComboWidget(node, name, label, values, value, onChange) {
  const w = node.addWidget("combo", name, value, (v) => onChange(v), { values, serialize: false });
  w.label = label;
  w.serialize = false;
  w.options.serialize = false;
  return w;
}

function isLinked(node, inputName) {
  return node.inputs?.some((i) => i.name === inputName && i.link != null) ?? false;
}

function growToFit(node) {
  const [w, h] = node.computeSize();
  if (h > node.size[1] || w > node.size[0]) node.setSize([Math.max(w, node.size[0]), Math.max(h, node.size[1])]);
  node.setDirtyCanvas?.(true, true);
}

/** Everything the extension adds to one node; detach() takes all of it away again. */
class NodeUI {
  constructor(node, kind, app, api) {
    this.node = node;
    this.kind = kind;
    this.app = app;
    this.api = api;
    this.cleanups = []; // undo what attach() did to the node's widgets
    this.listeners = []; // remove the api listeners
    this.seen = "";
    this.phase = "idle";
    this.tracker = L.newTracker();
    this.startedAt = null;
    this.finishedAt = null;
    this.timer = null;
  }

  widget(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  attach() {
    const kind = this.kind;
    this.width = this.widget("width");
    this.height = this.widget("height");
    this.sizeWidget = this.widget("size");
    if (kind.size === "wh" && this.width && this.height) this.addSizePresets();
    if (kind.size === "base" && this.sizeWidget) this.wrapSnap(this.sizeWidget);
    this.addStatus();
    if (kind.reasoning) this.addReasoning();
    if (kind.panels && this.widget("panels")) this.addPanels();
    this.listen();
    this.refresh(true);
    growToFit(this.node);
  }

  /** Take everything away again (used when attach() fails half way). */
  detach() {
    this.unlisten();
    for (const undo of this.cleanups.splice(0).reverse()) {
      try {
        undo();
      } catch (err) {
        console.warn(TAG, err);
      }
    }
  }

  // -- size presets ----------------------------------------------------------------------------

  get base() {
    const b = Number(this.node.properties?.[PROP_BASE]);
    return L.BASE_SIZES.includes(b) ? b : L.DEFAULT_BASE;
  }

  set base(b) {
    this.node.properties ??= {};
    if (b === L.DEFAULT_BASE) delete this.node.properties[PROP_BASE];
    else this.node.properties[PROP_BASE] = b;
  }

  fits(size) {
    const ok = (v, widget) => v >= (widget.options?.min ?? L.TOKEN_PX) && v <= (widget.options?.max ?? Infinity);
    return ok(size.width, this.width) && ok(size.height, this.height);
  }

  /** The aspect combo's values at the current base, without presets the widgets cannot take. */
  presetValues() {
    return [L.CUSTOM, ...L.bucketSizes(this.base).filter((s) => this.fits(s)).map((s) => L.presetLabel(s.width, s.height))];
  }

  addSizePresets() {
    this.wrapSnap(this.width);
    this.wrapSnap(this.height);
    this.aspect = addComboWidget(this.node, "nextstep_aspect", "aspect", this.presetValues(), L.CUSTOM, (label) => {
      const size = L.presetSize(label, this.base);
      if (size) this.setSize(size.width, size.height);
      this.refresh(true);
    });
    this.baseCombo = addComboWidget(this.node, "nextstep_base", "preset base", L.BASE_SIZES.map(String),
      String(this.base), (value) => this.changeBase(Number(value)));
    this.track(this.aspect);
    this.track(this.baseCombo);
  }

  /** A new base keeps the chosen bucket (512x512 at 512 -> 1024x1024 at 1024). */
  changeBase(base) {
    const from = L.bucketSizes(this.base).findIndex((s) => s.width === this.width.value && s.height === this.height.value);
    this.base = base;
    const to = from >= 0 ? L.bucketSizes(base)[from] : null;
    if (to && this.fits(to)) this.setSize(to.width, to.height);
    this.refresh(true);
  }

  setSize(width, height) {
    for (const [w, v] of [[this.width, width], [this.height, height]]) {
      if (w.value !== v) {
        w.value = v;
        w.callback?.(v);
      }
    }
    this.node.setDirtyCanvas?.(true, true);
    this.app.graph?.change?.();
  }

  /** Snap a size widget to multiples of 16 (within its min/max) whenever it changes. */
  wrapSnap(w) {
    const original = w.callback;
    const snap = () => {
      const v = L.snapToMultiple(w.value, { min: w.options?.min ?? L.TOKEN_PX, max: w.options?.max ?? Infinity });
      if (v !== w.value) w.value = v;
    };
    w.callback = function (...args) {
      const result = original?.apply(this, args);
      try {
        snap();
      } catch (err) {
        console.warn(TAG, err);
      }
      return result;
    };
    this.cleanups.push(() => {
      w.callback = original;
    });
  }

  /** Show the preset (and base) the current size is, with the options of that base. */
  syncPresets() {
    const match = L.matchPreset(this.width.value, this.height.value, this.base);
    if (match) this.base = match.base;
    const base = String(this.base);
    if (this.baseCombo.value !== base) this.baseCombo.value = base;
    if (this.optionsBase !== base) {
      this.optionsBase = base;
      this.aspect.options.values = this.presetValues();
    }
    const label = match ? match.label : L.CUSTOM;
    if (this.aspect.value !== label) this.aspect.value = label;
  }

  // -- status line -----------------------------------------------------------------------------

  addStatus() {
    const box = el("div", "nextstep-status");
    this.sizeLine = el("div", "ns-size");
    this.runLine = el("div", "ns-run");
    // the lines this node has: the size line where it has a size, the run line where it samples;
    // the run line is reserved even when idle, so a run never resizes the node
    const lines = [];
    if (this.kind.size) lines.push(this.sizeLine);
    if (this.kind.run !== false) lines.push(this.runLine);
    box.append(...lines);
    const height = 4 + 19 * lines.length;
    this.status = addPanelWidget(this.node, "nextstep_status", box, {
      margin: 3, getMinHeight: () => height, getMaxHeight: () => height,
    });
    this.track(this.status);
  }

  sizeText() {
    const { node, kind } = this;
    if (kind.size === "wh" && this.width && this.height) {
      if (isLinked(node, "width") || isLinked(node, "height")) return "size comes from a linked input";
      const w = this.width.value;
      const h = this.height.value;
      const count = kind.panels ? Math.max(1, this.rows?.length ?? 1) : Number(this.widget(kind.count)?.value ?? 1);
      return L.sizeSummary(w, h, { count, unit: kind.unit, per: kind.per, preset: L.matchPreset(w, h, this.base) });
    }
    if (kind.size === "base" && this.sizeWidget) {
      const s = Number(this.sizeWidget.value);
      if (!Number.isFinite(s)) return "";
      return `base ${s} · ≈${L.formatCount(L.tokenCount(s, s))} tokens · output size follows the input image`;
    }
    return "";
  }

  runText() {
    const now = performance.now();
    const stats = L.progressStats(this.tracker, now);
    const end = this.finishedAt ?? now;
    const elapsed = this.startedAt === null ? null : (end - this.startedAt) / 1000;
    if (this.kind.panels) {
      return L.storyboardStatusText(this.phase, L.storyboardStats(this.tracker, this.runPanels, now), elapsed);
    }
    return L.statusText(this.phase, stats, elapsed);
  }

  paintStatus() {
    const size = this.sizeText();
    this.sizeLine.textContent = size;
    this.sizeLine.title = size;
    this.runLine.textContent = this.runText();
  }

  // -- progress --------------------------------------------------------------------------------

  isMe(id) {
    if (id === null || id === undefined) return false;
    const mine = String(this.node.id);
    const s = String(id);
    const root = this.app.rootGraph ?? this.app.graph;
    return s === mine || (this.node.graph !== root && s.endsWith(`:${mine}`));
  }

  on(type, handler) {
    const wrapped = (event) => {
      try {
        handler(event.detail);
      } catch (err) {
        console.warn(TAG, err);
      }
    };
    this.api.addEventListener(type, wrapped);
    this.listeners.push(() => this.api.removeEventListener(type, wrapped));
  }

  /** Called when the node is removed from its graph: no listener or timer outlives it. */
  unlisten() {
    this.stopTimer();
    for (const remove of this.listeners.splice(0)) remove();
  }

  /** Subscribe to the server's execution messages (once; again after unlisten()). */
  listen() {
    if (this.listeners.length || this.kind.run === false) return;
    this.on("executing", (detail) => {
      const id = detail && typeof detail === "object" ? detail.node : detail;
      if (this.isMe(id)) this.start();
      else if (this.phase === "starting" || this.phase === "running") this.finish("done");
    });
    this.on("progress", (d) => {
      if (d && this.isMe(d.node)) this.progress(d.value, d.max);
    });
    this.on("progress_state", (d) => {
      for (const [id, st] of Object.entries(d?.nodes ?? {})) {
        if ((this.isMe(id) || this.isMe(st?.display_node_id)) && st?.state === "running") this.progress(st.value, st.max);
      }
    });
    for (const type of ["execution_error", "execution_interrupted"]) {
      this.on(type, () => {
        if (this.phase === "starting" || this.phase === "running") this.finish("stopped");
      });
    }
    this.on("execution_success", () => {
      if (this.phase === "starting" || this.phase === "running") this.finish("done");
    });
  }

  /** How many panels the storyboard was queued with: its panels text (blank lines skipped, as
   *  the node does), or null when a link provides them. */
  queuedPanels() {
    const raw = this.widget("panels");
    if (!raw || isLinked(this.node, "panels")) return null;
    return L.panelsFromText(raw.value).length || null;
  }

  start() {
    if (this.kind.panels) this.runPanels = this.queuedPanels();
    this.phase = "starting";
    this.tracker = L.newTracker();
    this.startedAt = performance.now();
    this.finishedAt = null;
    this.stopTimer();
    this.timer = setInterval(() => this.paintStatus(), 1000);
    this.paintStatus();
  }

  progress(value, max) {
    if (!Number.isFinite(value) || !Number.isFinite(max) || max <= 0) return;
    if (this.phase !== "running" && this.phase !== "starting") this.start();
    this.phase = "running";
    this.tracker = L.trackProgress(this.tracker, value, max, performance.now());
    this.paintStatus();
  }

  finish(phase) {
    this.phase = phase;
    this.finishedAt = performance.now();
    this.stopTimer();
    this.paintStatus();
  }

  stopTimer() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  executed(output) {
    if (this.phase === "starting" || this.phase === "running") this.finish("done");
    if (this.kind.reasoning && output && "reasoning" in output) {
      this.node.properties ??= {};
      const text = L.reasoningFromOutput(output);
      if (text) this.node.properties[PROP_REASONING] = text;
      else delete this.node.properties[PROP_REASONING];
      this.paintReasoning();
    }
  }

  // -- Self-CoT reasoning ----------------------------------------------------------------------

  addReasoning() {
    const box = el("div", "nextstep-reasoning");
    const head = el("div", "ns-head");
    const title = el("span", "", "Self-CoT reasoning (last run)");
    const copy = el("button", "", "copy");
    copy.title = "Copy the reasoning text";
    this.reasoningText = el("textarea");
    this.reasoningText.readOnly = true;
    this.reasoningText.spellcheck = false;
    copy.addEventListener("click", () => this.copyReasoning(copy));
    head.append(title, copy);
    box.append(head, this.reasoningText);
    this.reasoning = addPanelWidget(this.node, "nextstep_reasoning", box, { getMinHeight: () => 110 });
    this.track(this.reasoning);
  }

  async copyReasoning(button) {
    const text = this.reasoningText.value;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      this.reasoningText.select();
      document.execCommand?.("copy");
    }
    button.textContent = "copied";
    setTimeout(() => {
      button.textContent = "copy";
    }, 1200);
  }

  paintReasoning() {
    if (!this.reasoning) return;
    const text = this.node.properties?.[PROP_REASONING] ?? "";
    const hidden = !text;
    if (this.reasoningText.value !== text) this.reasoningText.value = text;
    if (this.reasoning.hidden !== hidden) {
      this.reasoning.hidden = hidden;
      if (!hidden) growToFit(this.node);
      else this.node.setDirtyCanvas?.(true, true);
    }
  }

  // -- storyboard panels -----------------------------------------------------------------------

  addPanels() {
    const raw = this.widget("panels");
    this.panelsWidget = raw;
    this.rows = L.panelsFromText(raw.value);
    this.written = raw.value;
    const wasHidden = raw.hidden;
    raw.hidden = true;
    this.cleanups.push(() => {
      raw.hidden = wasHidden;
    });

    this.panelBox = el("div", "nextstep-panels");
    this.panelList = el("div", "ns-list");
    const foot = el("div", "ns-foot");
    this.panelNote = el("span", "ns-note");
    const add = el("button", "", "+ panel");
    add.title = "Add a panel at the end";
    add.addEventListener("click", () => this.editRows(L.insertPanel(this.rows), this.rows.length));
    const asText = el("button", "", "text");
    asText.title = "Show the panels as the node's plain text (one panel per line)";
    asText.addEventListener("click", () => {
      raw.hidden = !raw.hidden;
      asText.textContent = raw.hidden ? "text" : "hide text";
      growToFit(this.node);
    });
    foot.append(this.panelNote, add, asText);
    this.panelBox.append(this.panelList, foot);
    this.panelEditor = addPanelWidget(this.node, "nextstep_panels", this.panelBox, {
      getMinHeight: () => 30 + 26 * Math.max(1, this.rows.length),
      getMaxHeight: () => 30 + 26 * Math.max(1, this.rows.length),
    });
    this.track(this.panelEditor);
    this.renderRows();
  }

  /** Replace the rows, write the node's text, re-render; focus row `focus` (caret at `caret`). */
  editRows(rows, focus = null, caret = null) {
    this.rows = rows;
    this.writePanels();
    this.renderRows(focus, caret);
    growToFit(this.node);
  }

  writePanels() {
    const text = L.panelsToText(this.rows);
    this.written = text;
    if (this.panelsWidget.value !== text) this.panelsWidget.value = text;
    this.app.graph?.change?.();
    this.paintStatus();
  }

  /** The line under the rows: how many panels, or that a link provides them. */
  paintPanelNote() {
    const linked = isLinked(this.node, "panels");
    this.panelBox.classList.toggle("ns-linked", linked);
    const filled = this.rows.filter((r) => r.trim() !== "").length;
    this.panelNote.textContent = linked
      ? "panels come from a linked input"
      : `${filled} panel${filled === 1 ? "" : "s"}${this.rows.length ? "" : " · add one"}`;
  }

  renderRows(focus = null, caret = null) {
    this.paintPanelNote();
    const n = this.rows.length;
    const rows = this.rows.map((text, i) => {
      const row = el("div", "ns-row");
      const idx = el("span", "ns-idx", String(i + 1));
      const input = el("input");
      input.type = "text";
      input.value = text;
      input.placeholder = `panel ${i + 1} prompt`;
      input.spellcheck = false;
      input.addEventListener("input", () => {
        this.rows[i] = input.value;
        this.writePanels();
        this.paintPanelNote();
      });
      input.addEventListener("paste", (ev) => {
        const pasted = ev.clipboardData?.getData("text") ?? "";
        if (!/[\r\n]/.test(pasted)) return;
        ev.preventDefault();
        const before = input.value.slice(0, input.selectionStart ?? input.value.length);
        const after = input.value.slice(input.selectionEnd ?? input.value.length);
        const next = L.pasteIntoPanel(this.rows, i, before, pasted, after);
        this.editRows(next, i + (next.length - this.rows.length));
      });
      input.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter") {
          ev.preventDefault();
          const at = input.selectionStart ?? input.value.length;
          const next = [...this.rows];
          next[i] = input.value.slice(0, at);
          this.editRows(L.insertPanel(next, i + 1, input.value.slice(at)), i + 1, 0);
        } else if (ev.key === "Backspace" && input.value === "" && this.rows.length > 1) {
          ev.preventDefault();
          this.editRows(L.removePanel(this.rows, i), Math.max(0, i - 1));
        }
      });
      const up = el("button", "", "↑");
      up.title = "Move up";
      up.disabled = i === 0;
      up.addEventListener("click", () => this.editRows(L.movePanel(this.rows, i, i - 1)));
      const down = el("button", "", "↓");
      down.title = "Move down";
      down.disabled = i === n - 1;
      down.addEventListener("click", () => this.editRows(L.movePanel(this.rows, i, i + 1)));
      const del = el("button", "", "✕");
      del.title = "Remove this panel";
      del.addEventListener("click", () => this.editRows(L.removePanel(this.rows, i)));
      row.append(idx, input, up, down, del);
      return row;
    });
    this.panelList.replaceChildren(...rows);
    if (focus !== null) {
      const input = this.panelList.children[focus]?.querySelector("input");
      if (input) {
        input.focus();
        const at = caret ?? input.value.length;
        input.setSelectionRange(at, at);
      }
    }
  }

  /** The node's text changed elsewhere (plain text widget, workflow load, undo): re-read it. */
  syncPanels() {
    const text = this.panelsWidget.value ?? "";
    if (text === this.written) return;
    this.written = text;
    this.rows = L.panelsFromText(text);
    this.renderRows();
  }

  // -- bookkeeping -----------------------------------------------------------------------------

  /** Remember a widget we added, so detach() removes it. */
  track(widget) {
    this.cleanups.push(() => {
      const i = this.node.widgets?.indexOf(widget) ?? -1;
      if (i < 0) return;
      if (this.node.removeWidget) this.node.removeWidget(widget);
      else this.node.widgets.splice(i, 1);
    });
  }

  /** Cheap check (run on every canvas draw): repaint when a value we show changed. */
  refresh(force = false) {
    if (this.panelsWidget) this.syncPanels();
    const key = [
      this.width?.value, this.height?.value, this.sizeWidget?.value, this.widget(this.kind.count ?? "")?.value,
      this.rows?.length, isLinked(this.node, "width"), isLinked(this.node, "height"), isLinked(this.node, "panels"),
    ].join("|");
    if (!force && key === this.seen) return;
    this.seen = key;
    if (this.aspect) this.syncPresets();
    if (this.panelBox) this.paintPanelNote();
    this.paintStatus();
    this.paintReasoning();
  }
}

function install(app, api) {
  app.registerExtension({
    name: EXTENSION,
    setup() {
      injectStyle();
    },
    beforeRegisterNodeDef(nodeType, nodeData) {
      const kind = KINDS[nodeData?.name];
      if (!kind) return;
      const proto = nodeType.prototype;
      chain(proto, "onNodeCreated", function () {
        injectStyle();
        const ui = new NodeUI(this, kind, app, api);
        try {
          ui.attach();
          this.nextstepUI = ui;
        } catch (err) {
          ui.detach();
          warn(`could not set up ${nodeData.name} #${this.id}`, err);
        }
      });
      chain(proto, "onConfigure", function () {
        this.nextstepUI?.refresh(true);
      });
      chain(proto, "onExecuted", function (output) {
        this.nextstepUI?.executed(output);
      });
      chain(proto, "onConnectionsChange", function () {
        this.nextstepUI?.refresh();
      });
      chain(proto, "onDrawForeground", function () {
        this.nextstepUI?.refresh();
      });
      chain(proto, "onAdded", function () {
        this.nextstepUI?.listen();
      });
      chain(proto, "onRemoved", function () {
        this.nextstepUI?.unlisten();
      });
    },
  });
}

try {
  const { app, api } = await comfy();
  install(app, api);
} catch (err) {
  warn("the extension did not load", err);
}
