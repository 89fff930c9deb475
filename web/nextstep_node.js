// Everything the extension adds to one node, as a set of features (size presets or the edit
// size, the status line, the reasoning box, the panel editor), and when they repaint. Repaints
// follow the widgets' own callbacks, node.onWidgetChanged, configure, connection changes and run
// output; Vue nodes never draw on the canvas, so the canvas draw hook is only a cheap extra check.
import { EditSize, SizePresets } from "./nextstep_presets.js";
import { PanelEditor } from "./nextstep_panels.js";
import { ReasoningBox } from "./nextstep_reasoning.js";
import { StatusLine } from "./nextstep_status.js";
import { afterCallback, growToFit, TAG } from "./nextstep_frontend.js";

export class NodeUI {
  constructor(node, kind, app, api) {
    this.node = node;
    this.kind = kind;
    this.app = app;
    this.api = api;
    this.cleanups = []; // undo what attach() did to the node's widgets
    this.features = [];
    this.seen = null;
  }

  widget(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  attach() {
    const { kind } = this;
    const wanted = [];
    if (kind.size === "wh") wanted.push((this.size = new SizePresets(this)));
    if (kind.size === "base") wanted.push((this.size = new EditSize(this)));
    wanted.push((this.status = new StatusLine(this)));
    if (kind.reasoning) wanted.push(new ReasoningBox(this));
    if (kind.panels) wanted.push((this.panels = new PanelEditor(this)));
    for (const feature of wanted) {
      if (feature.attach()) this.features.push(feature);
      else if (feature === this.size) this.size = null;
      else if (feature === this.panels) this.panels = null;
    }
    // a count widget (batch_size) changes the cost line too; the size widgets already refresh
    const count = kind.count && this.widget(kind.count);
    for (const w of [count, this.widget("width"), this.widget("height"), this.widget("size"), this.widget("fit")]) {
      if (w) this.cleanups.push(afterCallback(w, () => this.refresh()));
    }
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

  /** Remember a widget we added, so detach() removes it. */
  track(widget) {
    this.cleanups.push(() => {
      const i = this.node.widgets?.indexOf(widget) ?? -1;
      if (i < 0) return;
      if (this.node.removeWidget) this.node.removeWidget(widget);
      else this.node.widgets.splice(i, 1);
    });
  }

  /** The cost line's text (on the status widget). */
  costText() {
    if (!this.size) return "";
    if (this.kind.size === "base") return this.size.costText();
    const count = this.kind.panels
      ? Math.max(1, this.panels?.rows.length ?? 1)
      : Number(this.widget(this.kind.count ?? "")?.value ?? 1);
    return this.size.costText(count);
  }

  listen() {
    this.status?.listen();
  }

  unlisten() {
    this.status?.unlisten();
  }

  executed(output) {
    for (const f of this.features) f.executed?.(output);
    this.refresh(true);
  }

  /** Cheap check: repaint when a value a feature shows changed (or always, with force). */
  refresh(force = false) {
    const key = [this.widget(this.kind.count ?? "")?.value, ...this.features.map((f) => f.key())].join("/");
    if (!force && key === this.seen) return;
    this.seen = key;
    for (const f of this.features) if (f !== this.status) f.refresh();
    this.status?.refresh();
  }
}
