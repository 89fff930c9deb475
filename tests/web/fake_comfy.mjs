// Just enough of a browser and of the ComfyUI frontend to load web/nextstep.js under node:
// a DOM element tree, window.comfyAPI.{app,api}, and LiteGraph-like nodes whose widgets and
// serialisation follow the frontend's rules (widgets with serialize === false are not saved).
// FakeFrontend plays a user's edits the way each mode delivers them (seen in frontend 1.49.6
// and 1.58.1): the classic canvas calls the widget's callback, then node.onWidgetChanged, and
// redraws (onDrawForeground); Vue nodes call the callback only and never draw on the canvas, and
// hide a widget by its options.hidden. Input slots warn when `input.link` is read, as 1.58 does.

class FakeClassList {
  constructor(el) {
    this.el = el;
  }

  get names() {
    return this.el.className.split(/\s+/).filter(Boolean);
  }

  add(...names) {
    this.el.className = [...new Set([...this.names, ...names])].join(" ");
  }

  remove(...names) {
    this.el.className = this.names.filter((n) => !names.includes(n)).join(" ");
  }

  toggle(name, force) {
    const on = force ?? !this.contains(name);
    if (on) this.add(name);
    else this.remove(name);
    return on;
  }

  contains(name) {
    return this.names.includes(name);
  }
}

export class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.children = [];
    this.parentNode = null;
    this.className = "";
    this.classList = new FakeClassList(this);
    this.textContent = "";
    this.value = "";
    this.title = "";
    this.style = {};
    this.disabled = false;
    this.listeners = {};
    this.selectionStart = null;
    this.selectionEnd = null;
  }

  append(...children) {
    for (const c of children) {
      c.parentNode = this;
      this.children.push(c);
    }
  }

  appendChild(c) {
    this.append(c);
    return c;
  }

  replaceChildren(...children) {
    this.children = [];
    this.append(...children);
  }

  addEventListener(type, fn) {
    (this.listeners[type] ??= []).push(fn);
  }

  /** Fire an event at this element; returns whether a listener called preventDefault(). */
  fire(type, extra = {}) {
    let prevented = false;
    for (const fn of this.listeners[type] ?? []) fn({ preventDefault: () => (prevented = true), ...extra });
    return prevented;
  }

  contains(other) {
    for (let e = other; e; e = e.parentNode) if (e === this) return true;
    return false;
  }

  /** Descendants with this tag name, depth first. */
  all(tag) {
    const out = [];
    for (const c of this.children) {
      if (c.tagName === tag.toUpperCase()) out.push(c);
      out.push(...c.all(tag));
    }
    return out;
  }

  querySelector(tag) {
    return this.all(tag)[0] ?? null;
  }

  focus() {
    globalThis.document.activeElement = this;
  }

  setSelectionRange(a, b) {
    this.selectionStart = a;
    this.selectionEnd = b;
  }

  select() {}
}

export function installDocument() {
  const head = new FakeElement("head");
  globalThis.document = {
    head,
    activeElement: null,
    createElement: (tag) => new FakeElement(tag),
    getElementById: (id) => head.children.find((c) => c.id === id) ?? null,
    execCommand: () => true,
  };
}

/** The api object: an EventTarget that counts its listeners. */
export class FakeApi extends EventTarget {
  constructor() {
    super();
    this.live = 0;
  }

  addEventListener(type, fn, opts) {
    this.live += 1;
    super.addEventListener(type, fn, opts);
  }

  removeEventListener(type, fn, opts) {
    this.live -= 1;
    super.removeEventListener(type, fn, opts);
  }

  send(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

export class FakeApp {
  constructor() {
    this.extensions = [];
    this.changes = 0;
    this.graph = { change: () => (this.changes += 1) };
    this.rootGraph = this.graph;
  }

  registerExtension(ext) {
    this.extensions.push(ext);
  }
}

/** An input slot; reading `link` counts as a deprecated access (frontend 1.58 warns). */
export const deprecations = [];

class FakeInput {
  constructor(name, link) {
    this.name = name;
    this._link = link;
  }

  get link() {
    deprecations.push(`input.link (${this.name})`);
    return this._link;
  }

  set link(v) {
    deprecations.push(`input.link = (${this.name})`);
    this._link = v;
  }
}

/** A LiteGraph-like node base class; `spec` lists the Python widgets [name, value, options]. */
let lastId = 0;

export class FakeNode {
  constructor(spec, app) {
    this.id = ++lastId;
    this.graph = app.rootGraph;
    this.widgets = [];
    this.inputs = [];
    this.properties = {};
    this.size = [400, 300];
    for (const [name, value, options = {}] of spec) {
      const w = this.addWidget(options.type ?? (typeof value === "number" ? "number" : "text"), name, value,
        options.round16 ? function (v) { this.value = Math.round(v / 16) * 16; } : null, options);
      w.options = { ...options };
    }
  }

  addWidget(type, name, value, callback, options = {}) {
    const w = { type, name, value, callback, options: { ...options } };
    this.widgets.push(w);
    return w;
  }

  addDOMWidget(name, type, element, options = {}) {
    const w = { type, name, element, options: { ...options }, hidden: false };
    Object.defineProperty(w, "value", { get: () => options.getValue?.() ?? "", set: (v) => options.setValue?.(v) });
    this.widgets.push(w);
    return w;
  }

  isInputConnected(slot) {
    return slot < this.inputs.length && this.inputs[slot]._link != null;
  }

  removeWidget(w) {
    this.widgets.splice(this.widgets.indexOf(w), 1);
  }

  computeSize() {
    return [400, 200 + 30 * this.widgets.filter((w) => !w.hidden).length];
  }

  setSize(size) {
    this.size = size;
  }

  setDirtyCanvas() {}

  /** What the frontend writes to a saved workflow: values of widgets not marked serialize === false. */
  widgetsValues() {
    return this.widgets.filter((w) => w.serialize !== false).map((w) => w.value);
  }

  /** What graphToPrompt sends: widget name -> value, unless options.serialize === false. */
  promptInputs() {
    return Object.fromEntries(this.widgets.filter((w) => w.options?.serialize !== false).map((w) => [w.name, w.value]));
  }
}

const SIZE = { min: 16, max: 2048, step: 160, step2: 16, round16: true };

/** The Python widgets of each node, in order, as the nodes declare them. */
export const SPECS = {
  NextStepTextToImage: [
    ["prompt", "a red fox"], ["positive_prompt", "masterpiece"], ["negative_prompt", "lowres"],
    ["width", 512, SIZE], ["height", 512, SIZE], ["cfg", 7.5], ["steps", 28], ["timesteps_shift", 1.0],
    ["use_norm", false], ["sampler", "auto"], ["cfg_schedule", "constant"], ["self_cot", false], ["seed", 3407],
    ["control_after_generate", "fixed"], ["batch_size", 1],
  ],
  NextStepEdit: [
    ["instruction", "add a hat"], ["positive_prompt", ""], ["negative_prompt", "Copy original image."],
    ["fit", "bucket"], ["size", 512, SIZE], ["cfg", 7.5], ["cfg_img", 2.0], ["steps", 50],
    ["timesteps_shift", 3.2], ["use_norm", true], ["sampler", "auto"], ["cfg_schedule", "constant"], ["seed", 42],
    ["control_after_generate", "fixed"],
  ],
  NextStepStoryboard: [
    ["panels", "a fox wakes up\na fox walks to the river"], ["width", 512, SIZE], ["height", 512, SIZE],
    ["seed", 1], ["control_after_generate", "fixed"],
  ],
  NextStepStoryStart: [
    ["style", "An ink comic about a fox."], ["positive_prompt", "masterpiece"], ["negative_prompt", "lowres"],
    ["width", 512, SIZE], ["height", 512, SIZE], ["cfg", 7.5], ["steps", 28], ["timesteps_shift", 1.0],
    ["use_norm", false], ["sampler", "auto"], ["cfg_schedule", "constant"], ["mode", "story"],
  ],
  NextStepStoryboardPanel: [["prompt", "the fox sleeps"], ["seed", 2], ["control_after_generate", "fixed"]],
};

/** Run the extension's beforeRegisterNodeDef for `name` and create one node the way the frontend
 *  does: Python widgets first (constructor), then onNodeCreated, then onAdded. `patch(node)` runs
 *  before onNodeCreated. */
export function makeNode(ext, app, name, spec = SPECS[name], patch = null) {
  class NodeType extends FakeNode {}
  ext.beforeRegisterNodeDef(NodeType, { name });
  const node = new NodeType(spec, app);
  patch?.(node);
  node.onNodeCreated?.();
  node.onAdded?.(app.graph);
  return node;
}

/** How a user's actions reach the node in one frontend mode ("classic" or "vue"). */
export class FakeFrontend {
  constructor(mode) {
    this.mode = mode;
  }

  /** The user sets a widget's value (types a number, picks a combo entry, edits text). */
  set(node, name, value) {
    const w = node.widgets.find((x) => x.name === name);
    const old = w.value;
    w.value = value;
    w.callback?.(w.value);
    if (this.mode === "classic") {
      node.onWidgetChanged?.(w.name, w.value, old, w);
      this.draw(node);
    }
  }

  /** A frame of the canvas: only the classic canvas draws nodes. */
  draw(node) {
    if (this.mode === "classic") node.onDrawForeground?.({});
  }

  /** Whether this mode shows the widget (which must be on the node). The canvas reads
   *  widget.hidden on every frame; Vue nodes read options.hidden when they first render the
   *  widget, and frontend 1.49 does not notice a later change. */
  shown(node, widget) {
    if (!widget || !node.widgets.includes(widget)) return false;
    if (this.mode === "classic") return !widget.hidden;
    if (!("vueHidden" in widget)) widget.vueHidden = Boolean(widget.options?.hidden);
    return !widget.vueHidden;
  }

  /** A link is made to (or removed from) the input `name`. */
  connect(node, name, link = 7) {
    const slot = node.inputs.find((i) => i.name === name);
    if (slot) slot._link = link;
    else node.inputs.push(new FakeInput(name, link));
    node.onConnectionsChange?.(1, node.inputs.length - 1, link != null);
    this.draw(node);
  }

  /** A workflow is loaded: values and properties are restored, then onConfigure. */
  configure(node, { values = {}, properties = {} } = {}) {
    for (const [name, v] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = v;
    Object.assign(node.properties, properties);
    node.onConfigure?.({});
    this.draw(node);
  }
}
