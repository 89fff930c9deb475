// What the NextStep extension needs from the ComfyUI frontend, in one place, written so it works
// the same in the classic canvas and with Vue nodes ("Nodes 2.0"), on frontend 1.49 and 1.58:
// the app/api objects, chained node hooks, widgets that are never saved, hiding a widget, reading
// whether an input is linked, and hearing when a widget's value changes.

export const TAG = "[NextStep]";

export function warn(what, err) {
  console.warn(`${TAG} ${what}; the node keeps its plain widgets.`, err);
}

/** The frontend's app and api objects (window.comfyAPI on current frontends, modules on old ones). */
export async function comfy() {
  let app = window.comfyAPI?.app?.app;
  let api = window.comfyAPI?.api?.api;
  if (!app) app = (await import("../../scripts/app.js")).app;
  if (!api) api = (await import("../../scripts/api.js")).api;
  return { app, api };
}

/** Calls the original prototype method first, then `fn`; an error in `fn` is logged, never thrown. */
export function chain(proto, method, fn) {
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

export function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** A DOM widget that is never saved in widgets_values nor sent with the prompt. */
export function addPanelWidget(node, name, element, options) {
  element.classList.add("nextstep-ui");
  const w = node.addDOMWidget(name, "nextstep", element, { serialize: false, hideOnZoom: false, ...options });
  w.serialize = false;
  w.options.serialize = false;
  return w;
}

/** A combo that is never saved in widgets_values nor sent with the prompt. */
export function addComboWidget(node, name, label, values, value, onChange) {
  const w = node.addWidget("combo", name, value, (v) => onChange(v), { values, serialize: false });
  w.label = label;
  w.serialize = false;
  w.options.serialize = false;
  return w;
}

/** Hide or show a widget. The canvas reads `widget.hidden`; Vue nodes read `options.hidden` (the
 *  frontend's own code sets both), so both are set. */
export function setHidden(widget, hidden) {
  widget.hidden = hidden;
  widget.options ??= {};
  widget.options.hidden = hidden;
}

/** Whether the input named `inputName` has a link. Uses node.isInputConnected (frontend 1.49 and
 *  1.58; 1.58 deprecates reading `input.link`), falling back to the slot for older frontends. */
export function isLinked(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0) return false;
  if (typeof node.isInputConnected === "function") return Boolean(node.isInputConnected(slot));
  return node.inputs[slot].link != null;
}

/** Run `fn` after the widget's own callback whenever its value changes. The canvas and Vue nodes
 *  both call the callback when a user edits a value (Vue nodes never draw on the canvas, so
 *  onDrawForeground cannot be relied on). Returns the undo. */
export function afterCallback(widget, fn) {
  const original = widget.callback;
  widget.callback = function (...args) {
    const result = original?.apply(this, args);
    try {
      fn(...args);
    } catch (err) {
      console.warn(TAG, err);
    }
    return result;
  };
  return () => {
    widget.callback = original;
  };
}

export function growToFit(node) {
  const [w, h] = node.computeSize();
  if (h > node.size[1] || w > node.size[0]) node.setSize([Math.max(w, node.size[0]), Math.max(h, node.size[1])]);
  node.setDirtyCanvas?.(true, true);
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
.nextstep-panels textarea.ns-text { height: 90px; resize: none; box-sizing: border-box; width: 100%;
  font: 12px/1.4 ui-monospace, monospace; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 4px; padding: 4px 6px; }
`;

export function injectStyle() {
  if (document.getElementById("nextstep-ui-style")) return;
  const style = el("style");
  style.id = "nextstep-ui-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}
