// The Self-CoT reasoning of the last run on NextStep Text to Image: a read-only box (selectable,
// with a copy button) that is hidden until a run returns reasoning, and saved with the workflow
// in node.properties (never in widgets_values, so the workflow loads unchanged without it).
import * as L from "./nextstep_logic.js";
import { addPanelWidget, el, growToFit, setHidden } from "./nextstep_frontend.js";

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
    this.widget = addPanelWidget(this.node, "nextstep_reasoning", box, { getMinHeight: () => 110 });
    this.ui.track(this.widget);
    return true;
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
    const hidden = !text;
    if (this.text.value !== text) this.text.value = text;
    if (this.widget.hidden !== hidden || this.widget.options?.hidden !== hidden) {
      setHidden(this.widget, hidden);
      if (!hidden) growToFit(this.node);
      else this.node.setDirtyCanvas?.(true, true);
    }
  }

  executed(output) {
    if (!output || !("reasoning" in output)) return;
    this.node.properties ??= {};
    const text = L.reasoningFromOutput(output);
    if (text) this.node.properties[PROP_REASONING] = text;
    else delete this.node.properties[PROP_REASONING];
  }
}
