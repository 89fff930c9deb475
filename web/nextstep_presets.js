// Sizes and what they cost: aspect presets (the official training buckets) that set width and
// height, width/height (and the edit node's `size`) snapped to multiples of 16, and the cost line
// under the widgets. The cost line of NextStep Edit says what will be drawn: the fitted size of
// the last input once an image has run through, the fitting rule before that.
import * as L from "./nextstep_logic.js";
import { addComboWidget, afterCallback, isLinked } from "./nextstep_frontend.js";

const PROP_BASE = "nextstep_base";

/** Snap a size widget to multiples of 16 (within its min/max) whenever it changes. */
function snapOnChange(ui, w) {
  ui.cleanups.push(afterCallback(w, () => {
    const v = L.snapToMultiple(w.value, { min: w.options?.min ?? L.TOKEN_PX, max: w.options?.max ?? Infinity });
    if (v !== w.value) w.value = v;
  }));
}

/** Aspect and base combos over width/height, on Text to Image, Storyboard and Story Start. */
export class SizePresets {
  constructor(ui) {
    this.ui = ui;
    this.node = ui.node;
  }

  attach() {
    this.width = this.ui.widget("width");
    this.height = this.ui.widget("height");
    if (!this.width || !this.height) return false;
    snapOnChange(this.ui, this.width);
    snapOnChange(this.ui, this.height);
    this.aspect = addComboWidget(this.node, "nextstep_aspect", "aspect", this.presetValues(), L.CUSTOM, (label) => {
      const size = L.presetSize(label, this.base);
      if (size) this.setSize(size.width, size.height);
      this.ui.refresh(true);
    });
    this.baseCombo = addComboWidget(this.node, "nextstep_base", "preset base", L.BASE_SIZES.map(String),
      String(this.base), (value) => this.changeBase(Number(value)));
    this.ui.track(this.aspect);
    this.ui.track(this.baseCombo);
    return true;
  }

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

  /** A new base keeps the chosen bucket (512x512 at 512 -> 1024x1024 at 1024). */
  changeBase(base) {
    const from = L.bucketSizes(this.base).findIndex((s) => s.width === this.width.value && s.height === this.height.value);
    this.base = base;
    const to = from >= 0 ? L.bucketSizes(base)[from] : null;
    if (to && this.fits(to)) this.setSize(to.width, to.height);
    this.ui.refresh(true);
  }

  setSize(width, height) {
    for (const [w, v] of [[this.width, width], [this.height, height]]) {
      if (w.value !== v) {
        w.value = v;
        w.callback?.(v);
      }
    }
    this.node.setDirtyCanvas?.(true, true);
    this.ui.app.graph?.change?.();
  }

  key() {
    return [this.width.value, this.height.value, isLinked(this.node, "width"), isLinked(this.node, "height")].join("|");
  }

  /** Show the preset (and base) the current size is, with the options of that base. */
  refresh() {
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

  /** The cost line: "512×512 · 32×32 grid · 1,024 tokens", times the batch or the panels. */
  costText(count) {
    if (isLinked(this.node, "width") || isLinked(this.node, "height")) return "size comes from a linked input";
    const { kind } = this.ui;
    const w = this.width.value;
    const h = this.height.value;
    return L.sizeSummary(w, h, { count, unit: kind.unit, per: kind.per, preset: L.matchPreset(w, h, this.base) });
  }
}

/** NextStep Edit's `size` (the base the input is fitted at) and its cost line. */
export class EditSize {
  constructor(ui) {
    this.ui = ui;
    this.node = ui.node;
    this.fitted = null; // {width, height, images, fit, size} of the last run
  }

  attach() {
    this.size = this.ui.widget("size");
    this.fit = this.ui.widget("fit");
    if (!this.size) return false;
    snapOnChange(this.ui, this.size);
    return true;
  }

  key() {
    return [this.size.value, this.fit?.value, isLinked(this.node, "size"), this.fitted?.width, this.fitted?.height].join("|");
  }

  refresh() {}

  /** The server reports the size the input was fitted to (ui.fitted: [width, height, images]). */
  executed(output) {
    const fitted = L.fittedFromOutput(output);
    if (!fitted) return;
    this.fitted = { ...fitted, fit: this.fit?.value, size: Number(this.size.value) };
  }

  costText() {
    if (isLinked(this.node, "size")) return "size comes from a linked input";
    const size = Number(this.size.value);
    const fit = this.fit?.value ?? "bucket";
    const f = this.fitted;
    // the last run's size holds as long as fit and size are what it ran with
    const last = f && f.fit === fit && f.size === size ? f : null;
    return L.editSummary({ fit, size, last });
  }
}
