// The storyboard panel editor on NextStep Storyboard: one row per panel (↑ ↓ ✕, + panel, Enter
// splits a row, Backspace on an empty row removes it, pasting lines makes rows). The rows are the
// node's own `panels` text (one panel per line), which stays the single source of truth: the
// plain text widget is folded away, `text` opens that text for editing inside the editor, and
// edits there show up in the rows.
import * as L from "./nextstep_logic.js";
import { addPanelWidget, afterCallback, el, growToFit, isLinked, setHidden } from "./nextstep_frontend.js";

const TEXT_HEIGHT = 96;

export class PanelEditor {
  constructor(ui) {
    this.ui = ui;
    this.node = ui.node;
  }

  attach() {
    const raw = this.ui.widget("panels");
    if (!raw) return false;
    this.raw = raw;
    this.rows = L.panelsFromText(raw.value);
    this.written = raw.value;
    const was = { hidden: raw.hidden, options: raw.options?.hidden };
    setHidden(raw, true);
    this.ui.cleanups.push(() => {
      raw.hidden = was.hidden;
      if (raw.options) raw.options.hidden = was.options;
    });
    this.ui.cleanups.push(afterCallback(raw, () => this.ui.refresh()));

    this.box = el("div", "nextstep-panels");
    this.list = el("div", "ns-list");
    const foot = el("div", "ns-foot");
    this.note = el("span", "ns-note");
    const add = el("button", "", "+ panel");
    add.title = "Add a panel at the end";
    add.addEventListener("click", () => this.edit(L.insertPanel(this.rows), this.rows.length));
    // the plain text, editable, inside the editor (not the folded-away widget: Vue nodes in
    // frontend 1.49 would not show it again)
    this.textBox = el("textarea", "ns-text");
    this.textBox.spellcheck = false;
    this.textBox.placeholder = "one panel prompt per line";
    this.textBox.addEventListener("input", () => {
      raw.value = this.textBox.value;
      this.ui.app.graph?.change?.();
      this.ui.refresh();
    });
    this.textOpen = false;
    const asText = el("button", "", "text");
    asText.title = "Show the panels as the node's plain text (one panel per line)";
    asText.addEventListener("click", () => {
      this.textOpen = !this.textOpen;
      asText.textContent = this.textOpen ? "hide text" : "text";
      this.paintText();
      growToFit(this.node);
    });
    foot.append(this.note, add, asText);
    this.box.append(this.list, foot, this.textBox);
    const height = () => 30 + 26 * Math.max(1, this.rows.length) + (this.textOpen ? TEXT_HEIGHT : 0);
    this.widget = addPanelWidget(this.node, "nextstep_panels", this.box, { getMinHeight: height, getMaxHeight: height });
    this.paintText();
    this.ui.track(this.widget);
    this.render();
    return true;
  }

  /** Replace the rows, write the node's text, re-render; focus row `focus` (caret at `caret`). */
  edit(rows, focus = null, caret = null) {
    this.rows = rows;
    this.write();
    this.render(focus, caret);
    growToFit(this.node);
  }

  write() {
    const text = L.panelsToText(this.rows);
    this.written = text;
    if (this.raw.value !== text) this.raw.value = text;
    this.paintText();
    this.ui.app.graph?.change?.();
    this.ui.refresh(true);
  }

  /** The text box shows the node's text while open (and is left alone while it has the caret). */
  paintText() {
    const box = this.textBox;
    box.style.display = this.textOpen ? "" : "none";
    if (document.activeElement !== box && box.value !== (this.raw.value ?? "")) box.value = this.raw.value ?? "";
  }

  /** The line under the rows: how many panels, or that a link provides them. */
  paintNote() {
    const linked = isLinked(this.node, "panels");
    this.box.classList.toggle("ns-linked", linked);
    const filled = this.rows.filter((r) => r.trim() !== "").length;
    this.note.textContent = linked
      ? "panels come from a linked input"
      : `${filled} panel${filled === 1 ? "" : "s"}${this.rows.length ? "" : " · add one"}`;
  }

  row(text, i, n) {
    const row = el("div", "ns-row");
    const idx = el("span", "ns-idx", String(i + 1));
    const input = el("input");
    input.type = "text";
    input.value = text;
    input.placeholder = `panel ${i + 1} prompt`;
    input.spellcheck = false;
    input.addEventListener("input", () => {
      this.rows[i] = input.value;
      this.write();
    });
    input.addEventListener("paste", (ev) => {
      const pasted = ev.clipboardData?.getData("text") ?? "";
      if (!/[\r\n]/.test(pasted)) return;
      ev.preventDefault();
      const before = input.value.slice(0, input.selectionStart ?? input.value.length);
      const after = input.value.slice(input.selectionEnd ?? input.value.length);
      const next = L.pasteIntoPanel(this.rows, i, before, pasted, after);
      this.edit(next, i + (next.length - this.rows.length));
    });
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") {
        ev.preventDefault();
        const at = input.selectionStart ?? input.value.length;
        const next = [...this.rows];
        next[i] = input.value.slice(0, at);
        this.edit(L.insertPanel(next, i + 1, input.value.slice(at)), i + 1, 0);
      } else if (ev.key === "Backspace" && input.value === "" && this.rows.length > 1) {
        ev.preventDefault();
        this.edit(L.removePanel(this.rows, i), Math.max(0, i - 1));
      }
    });
    const button = (label, title, disabled, onClick) => {
      const b = el("button", "", label);
      b.title = title;
      b.disabled = disabled;
      b.addEventListener("click", onClick);
      return b;
    };
    row.append(idx, input,
      button("↑", "Move up", i === 0, () => this.edit(L.movePanel(this.rows, i, i - 1))),
      button("↓", "Move down", i === n - 1, () => this.edit(L.movePanel(this.rows, i, i + 1))),
      button("✕", "Remove this panel", false, () => this.edit(L.removePanel(this.rows, i))));
    return row;
  }

  render(focus = null, caret = null) {
    this.paintNote();
    this.list.replaceChildren(...this.rows.map((text, i) => this.row(text, i, this.rows.length)));
    if (focus === null) return;
    const input = this.list.children[focus]?.querySelector("input");
    if (input) {
      input.focus();
      const at = caret ?? input.value.length;
      input.setSelectionRange(at, at);
    }
  }

  /** The node's text changed elsewhere (plain text widget, workflow load, undo): re-read it. */
  sync() {
    const text = this.raw.value ?? "";
    if (text === this.written) return;
    this.written = text;
    this.rows = L.panelsFromText(text);
    this.render();
    this.paintText();
  }

  key() {
    this.sync();
    return [this.rows.length, isLinked(this.node, "panels")].join("|");
  }

  refresh() {
    this.paintNote();
  }
}
