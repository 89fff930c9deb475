// The Self-CoT reasoning of the last run on NextStep Text to Image: a read-only box (selectable,
// with a copy button) that is there only once a run returned reasoning, and saved with the workflow
// in node.properties (never in widgets_values, so the workflow loads unchanged without it).
import * as L from "./nextstep_logic.js";
import { addPanelWidget, el, growToFit } from "./nextstep_frontend.js";

const PROP_REASONING = "nextstep_reasoning";

export class ReasoningBox {
  constructor(ui) {
    this.ui = ui;
    this.node = ui.node;
  }

  attach() {
    const box = el("div", "nextstep-reasoning");
    const head = el("div", "ns-head");
    const title = el("span", "", "Self-CoT reasoning (last run)");
    const copy = el("button", "", "copy");
    copy.title = "Copy the reasoning text";
    this.text = el("textarea");
    this.text.readOnly = true;
    this.text.spellcheck = false;
    copy.addEventListener("click", () => this.copy(copy));
    head.append(title, copy);
    box.append(head, this.text);
    this.box = box;
    this.widget = null; // only there while there is reasoning to show
    this.ui.cleanups.push(() => this.remove());
    return true;
  }

  /** The box is added when there is reasoning and removed when there is none, rather than
   *  hidden: Vue nodes in frontend 1.49 render a widget's visibility once, when it first appears. */
  add() {
    this.widget = addPanelWidget(this.node, "nextstep_reasoning", this.box, { getMinHeight: () => 110 });
    const widgets = this.node.widgets;
    const after = widgets.indexOf(this.ui.status?.widget);
    if (after >= 0 && widgets.indexOf(this.widget) !== after + 1) { // right under the status line
      widgets.splice(widgets.indexOf(this.widget), 1);
      widgets.splice(after + 1, 0, this.widget);
    }
    growToFit(this.node);
  }

  remove() {
    if (!this.widget) return;
    const w = this.widget;
    this.widget = null;
    if (this.node.removeWidget) this.node.removeWidget(w);
    else if (this.node.widgets?.includes(w)) this.node.widgets.splice(this.node.widgets.indexOf(w), 1);
    this.node.setDirtyCanvas?.(true, true);
  }

  async copy(button) {
    const text = this.text.value;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      this.text.select();
      document.execCommand?.("copy");
    }
    button.textContent = "copied";
    setTimeout(() => {
      button.textContent = "copy";
    }, 1200);
  }

  key() {
    return this.node.properties?.[PROP_REASONING] ?? "";
  }

  refresh() {
    const text = this.node.properties?.[PROP_REASONING] ?? "";
    if (this.text.value !== text) this.text.value = text;
    if (text && !this.widget) this.add();
    else if (!text && this.widget) this.remove();
  }

  executed(output) {
    if (!output || !("reasoning" in output)) return;
    this.node.properties ??= {};
    const text = L.reasoningFromOutput(output);
    if (text) this.node.properties[PROP_REASONING] = text;
    else delete this.node.properties[PROP_REASONING];
  }
}
