// Pure functions of the NextStep graph-editor extension: aspect buckets, size snapping, token
// counts, a token-rate / ETA estimator, and the storyboard panel text <-> rows mapping.
// No DOM and no ComfyUI here, so node's built-in test runner covers all of it
// (tests/web/nextstep_logic.test.mjs).

/** One image token covers 16x16 pixels. */
export const TOKEN_PX = 16;

/** Official training aspect buckets (h, w) in 16-px tokens at a 256-px base. */
export const BUCKETS = Object.freeze([
  [8, 32], [9, 28], [10, 25], [11, 23], [12, 21], [13, 19], [14, 18], [15, 17], [16, 16],
  [17, 15], [18, 14], [19, 13], [21, 12], [23, 11], [25, 10], [28, 9], [32, 8],
].map((hw) => Object.freeze(hw)));

/** Base sizes offered next to the aspect presets; NextStep-1 recommends 512 (1024 tokens). */
export const BASE_SIZES = Object.freeze([256, 512, 768, 1024]);
export const DEFAULT_BASE = 512;
export const CUSTOM = "custom";

/** Round half to even, as Python's round() does: the engine and the official code use it. */
export function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Every bucket at `base` px: [{width, height}] in pixels, in the official order
 *  (widest landscape first, tallest portrait last). At 512: 1024x256 ... 512x512 ... 256x1024. */
export function bucketSizes(base = DEFAULT_BASE) {
  return BUCKETS.map(([h, w]) => ({
    width: roundHalfEven((w * base) / 256) * TOKEN_PX,
    height: roundHalfEven((h * base) / 256) * TOKEN_PX,
  }));
}

// Familiar width:height names; a bucket shows the nearest one ("≈" when it is not exact).
const COMMON_RATIOS = [
  [1, 1], [9, 8], [5, 4], [4, 3], [3, 2], [16, 9], [2, 1], [5, 2], [3, 1], [4, 1],
].flatMap(([a, b]) => (a === b ? [[a, b]] : [[a, b], [b, a]]));

/** "4:3", "≈16:9": the familiar ratio nearest to width:height (on a log scale). */
export function ratioLabel(width, height) {
  const r = Math.log(width / height);
  let best = COMMON_RATIOS[0];
  for (const cand of COMMON_RATIOS) {
    if (Math.abs(Math.log(cand[0] / cand[1]) - r) < Math.abs(Math.log(best[0] / best[1]) - r)) best = cand;
  }
  const exact = width * best[1] === height * best[0];
  return `${exact ? "" : "≈"}${best[0]}:${best[1]}`;
}

/** Combo label of a preset: "672×384 (≈16:9)". */
export function presetLabel(width, height) {
  return `${width}×${height} (${ratioLabel(width, height)})`;
}

/** The aspect combo's values at `base`: "custom" first, then one label per bucket. */
export function presetOptions(base = DEFAULT_BASE) {
  return [CUSTOM, ...bucketSizes(base).map((s) => presetLabel(s.width, s.height))];
}

/** {width, height} of a preset label at `base`, or null for "custom" / unknown labels. */
export function presetSize(label, base = DEFAULT_BASE) {
  return bucketSizes(base).find((s) => presetLabel(s.width, s.height) === label) ?? null;
}

/** Which (base, label) a width x height is an official bucket of; `preferBase` is tried first
 *  (256x256 is the 1:1 bucket at 256 and nothing else, but 512x512 is only at 512).
 *  Returns {base, label} or null for a custom size. */
export function matchPreset(width, height, preferBase = DEFAULT_BASE) {
  const bases = [preferBase, ...BASE_SIZES.filter((b) => b !== preferBase)];
  for (const base of bases) {
    if (bucketSizes(base).some((s) => s.width === width && s.height === height)) {
      return { base, label: presetLabel(width, height) };
    }
  }
  return null;
}

/** The nearest multiple of `multiple` to v, kept inside [min, max] (themselves rounded inwards
 *  to multiples). Non-numbers fall back to the smallest allowed value. */
export function snapToMultiple(v, { multiple = TOKEN_PX, min = TOKEN_PX, max = Infinity } = {}) {
  const lo = Math.max(multiple, Math.ceil(min / multiple) * multiple);
  const hi = Number.isFinite(max) ? Math.floor(max / multiple) * multiple : Infinity;
  const n = Number(v);
  if (!Number.isFinite(n)) return lo;
  const snapped = roundHalfEven(n / multiple) * multiple;
  return Math.min(hi, Math.max(lo, snapped));
}

/** Image tokens of one width x height image: (H/16) * (W/16). */
export function tokenCount(width, height) {
  return Math.floor(width / TOKEN_PX) * Math.floor(height / TOKEN_PX);
}

/** "1,024" (fixed "," grouping, independent of the browser locale). */
export function formatCount(n) {
  return String(Math.round(n)).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** The cost line under the size widgets: "512×512 · 32×32 grid · 1,024 tokens", with
 *  "× 4 = 4,096 tokens" for several images (batch or panels), " per panel" (`per: "panel"`) where
 *  the count is not known on this node, and the preset it matches. */
export function sizeSummary(width, height, { count = 1, unit = "images", per = null, preset = null } = {}) {
  const tokens = tokenCount(width, height);
  let text = `${width}×${height} · ${Math.floor(width / TOKEN_PX)}×${Math.floor(height / TOKEN_PX)} grid · `;
  if (per) text += `${formatCount(tokens)} tokens per ${per}`;
  else if (count > 1) text += `${formatCount(tokens)} tokens × ${count} ${unit} = ${formatCount(tokens * count)}`;
  else text += `${formatCount(tokens)} tokens`;
  if (preset === null) text += " · not a training bucket";
  return text;
}

/** NextStep Edit's cost line. Once an image has run through (`last`: {width, height, images} of
 *  that run, at the current fit and size) it is what was drawn: "last input → 544×480 · 34×30 grid
 *  · 1,020 tokens"; before that, the rule `fit` follows at `size`: "≈512×512 at the input's aspect
 *  · ≈1,024 tokens" (a 64×64 input still becomes 512×512: the input is scaled, up or down). */
export function editSummary({ fit = "bucket", size = 512, last = null } = {}) {
  if (last) {
    const n = Math.max(1, last.images ?? 1);
    return `last input → ${sizeSummary(last.width, last.height, { count: n, unit: "images", preset: true })}`;
  }
  const s = Number(size);
  if (fit === "none") return "the input's own size (its sides must be multiples of 16)";
  if (!Number.isFinite(s) || s < TOKEN_PX) return "";
  if (fit === "center-crop") return `${s}×${s}, the centre square of the input · ${formatCount(tokenCount(s, s))} tokens`;
  return `≈${s}×${s} at the input's aspect · ≈${formatCount(tokenCount(s, s))} tokens`;
}

/** {width, height, images} from NextStep Edit's "executed" output (ui.fitted: [width, height,
 *  images]), or null when the output has none. */
export function fittedFromOutput(output) {
  const f = output?.fitted;
  if (!Array.isArray(f) || f.length < 2) return null;
  const [width, height, images = 1] = f.map(Number);
  if (![width, height, images].every((v) => Number.isInteger(v) && v > 0)) return null;
  return { width, height, images };
}

// ---------------------------------------------------------------------------------------------
// Progress: tokens per second and ETA from the timestamps of "progress" messages.

/** A fresh tracker (plain data; every update returns a new one). */
export function newTracker() {
  return { max: 0, value: 0, samples: [], firstT: null, firstValue: 0, lastT: null, resets: 0, prevRate: null };
}

/** Add one progress message (value of max, at time t in ms). A smaller value or a different max
 *  starts a new pass (a new image, panel or run) with its own rate; a repeated value is ignored.
 *  The rate is measured over the last `windowMs` or the later half of the pass, whichever is
 *  longer: long enough to average out the pauses live previews make, short enough to follow a
 *  real change of speed. Older samples are dropped (the newest of them is kept as the start).
 *  A new pass remembers the last rate of the one before (prevRate), for estimates that cover
 *  several passes before the new one has a rate of its own. */
export function trackProgress(tr, value, max, t, windowMs = 20000) {
  const restart = tr.lastT === null || max !== tr.max || value < tr.value;
  if (restart) {
    return {
      max, value, samples: [{ t, value }], firstT: t, firstValue: value, lastT: t,
      resets: tr.lastT === null ? tr.resets : tr.resets + 1,
      prevRate: tr.lastT === null ? (tr.prevRate ?? null) : (progressStats(tr).rate ?? tr.prevRate ?? null),
    };
  }
  if (value === tr.value) return tr; // the same step again (e.g. "progress" and "progress_state")
  let samples = [...tr.samples, { t, value }];
  const cut = samples.findIndex((s) => s.t >= t - Math.max(windowMs, (t - tr.firstT) / 2));
  if (cut > 1) samples = samples.slice(cut - 1);
  return { ...tr, value, samples, lastT: t };
}

/** {value, max, rate (tokens/s or null), eta (s or null), average (tokens/s over the pass),
 *  resets (passes before this one)}
 *  at time `now` (ms; defaults to the last sample): the ETA counts down between messages. */
export function progressStats(tr, now = tr.lastT) {
  const { samples } = tr;
  let rate = null;
  if (samples.length >= 2) {
    const a = samples[0];
    const b = samples[samples.length - 1];
    if (b.t > a.t && b.value > a.value) rate = ((b.value - a.value) * 1000) / (b.t - a.t);
  }
  let average = null;
  if (tr.lastT !== null && tr.lastT > tr.firstT && tr.value > tr.firstValue) {
    average = ((tr.value - tr.firstValue) * 1000) / (tr.lastT - tr.firstT);
  }
  let eta = null;
  if (tr.value >= tr.max && tr.max > 0) eta = 0;
  else if (rate) eta = Math.max(0, (tr.max - tr.value) / rate - Math.max(0, (now ?? 0) - (tr.lastT ?? 0)) / 1000);
  return { value: tr.value, max: tr.max, rate, eta, average, resets: tr.resets };
}

/** "0:07", "12:34", "1:02:03"; "—" when unknown. */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "—";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** "35.2"; 3 significant digits below 100, whole numbers above. */
export function formatRate(rate) {
  if (rate === null || rate === undefined || !Number.isFinite(rate)) return "—";
  if (rate >= 100) return formatCount(rate);
  if (rate >= 10) return rate.toFixed(1);
  return rate.toFixed(2);
}

/** The status line of a NextStep node. phase: "idle" | "starting" | "running" | "done" | "stopped";
 *  elapsed: seconds since the node started (model loading, the prompt, Self-CoT reasoning and
 *  image encoding all come before the first image token). */
export function statusText(phase, stats, elapsed = null) {
  const pass = stats?.resets ? ` (pass ${stats.resets + 1})` : "";
  switch (phase) {
    case "starting":
      return `preparing… ${formatDuration(elapsed)}`;
    case "running":
      return `${formatCount(stats.value)}/${formatCount(stats.max)} tokens${pass} · ${formatRate(stats.rate)} tok/s · ETA ${formatDuration(stats.eta)}`;
    case "done": {
      const rate = stats?.average ?? stats?.rate;
      const tokens = stats?.max ? `${formatCount(stats.max)} tokens${pass} · ` : "";
      return `done · ${tokens}${formatDuration(elapsed)}${rate ? ` · ${formatRate(rate)} tok/s` : ""}`;
    }
    case "stopped":
      return stats?.max
        ? `stopped at ${formatCount(stats.value)}/${formatCount(stats.max)} tokens${pass}`
        : "stopped";
    default:
      return "";
  }
}

// ---------------------------------------------------------------------------------------------
// The single storyboard node draws its panels one after another; the server's progress restarts
// at 0 for each, so panel k is pass k of the tracker, and every panel has the same token count.

/** progressStats plus {panel (k, from 1), panels (n, or null when unknown)}, with rate and ETA for
 *  the whole run: the ETA covers the rest of this panel and all (n - k) panels after it. Until a
 *  new panel has a rate of its own, the last rate of the panel before stands in. `panels` is the
 *  number of panels queued (null when it cannot be known, e.g. a linked input); a count smaller
 *  than the panels already seen is treated as unknown, and the ETA then covers this panel only. */
export function storyboardStats(tr, panels, now = tr.lastT) {
  const s = progressStats(tr, now);
  const panel = s.resets + 1;
  const n = Number.isInteger(panels) && panels >= panel ? panels : null;
  const rate = s.rate ?? tr.prevRate ?? null;
  const left = Math.max(0, s.max - s.value) + (n === null ? 0 : (n - panel) * s.max);
  let eta = null;
  if (left === 0 && s.max > 0) eta = 0;
  else if (rate) eta = Math.max(0, left / rate - Math.max(0, (now ?? 0) - (tr.lastT ?? 0)) / 1000);
  return { ...s, rate, eta, panel, panels: n };
}

/** The status line of NextStep Storyboard (stats from storyboardStats):
 *  "panel 2/4 · 412/1,024 tokens · 31.2 tok/s · ETA 1:25" while it runs ("panel 2 · … · panel ETA"
 *  when the number of panels is unknown), "done · 4 panels × 1,024 tokens · 2:10 · 30.8 tok/s",
 *  "stopped at panel 2/4 · 412/1,024 tokens". */
export function storyboardStatusText(phase, stats, elapsed = null) {
  const of = stats?.panels ? `${stats?.panel}/${stats.panels}` : `${stats?.panel}`;
  const tokens = `${formatCount(stats?.value)}/${formatCount(stats?.max)} tokens`;
  switch (phase) {
    case "running":
      return `panel ${of} · ${tokens} · ${formatRate(stats.rate)} tok/s · ${stats.panels ? "ETA" : "panel ETA"} ${formatDuration(stats.eta)}`;
    case "done": {
      if (!stats?.max) return statusText(phase, stats, elapsed);
      const rate = stats.average ?? stats.rate;
      const done = stats.value >= stats.max ? stats.panel : stats.panel - 1;
      return `done · ${done} panel${done === 1 ? "" : "s"} × ${formatCount(stats.max)} tokens · ${formatDuration(elapsed)}${rate ? ` · ${formatRate(rate)} tok/s` : ""}`;
    }
    case "stopped":
      return stats?.max ? `stopped at panel ${of} · ${tokens}` : "stopped";
    default:
      return statusText(phase, stats, elapsed);
  }
}

// ---------------------------------------------------------------------------------------------
// Self-CoT reasoning as it arrives in the "executed" message: ui {"reasoning": [text, ...]}.

/** The reasoning text of a node's output (several batch items joined), or "" when there is none. */
export function reasoningFromOutput(output) {
  const r = output?.reasoning;
  const parts = (Array.isArray(r) ? r : [r]).flat().filter((x) => typeof x === "string" && x.trim() !== "");
  return parts.join("\n\n———\n\n");
}

// ---------------------------------------------------------------------------------------------
// Storyboard panels: the node's `panels` widget is one panel prompt per line, blank lines ignored.

/** Text -> rows: one row per non-blank line, the line kept exactly as written. */
export function panelsFromText(text) {
  return String(text ?? "").split(/\r\n|\r|\n/).filter((line) => line.trim() !== "");
}

/** One row as one line: inner line breaks become spaces (a panel can never span two lines). */
export function cleanPanel(row) {
  return String(row ?? "").replace(/[ \t]*(\r\n|\r|\n)+[ \t]*/g, " ");
}

/** Rows -> text: blank rows are left out, so panelsFromText(panelsToText(rows)) keeps every
 *  non-blank row and its order. */
export function panelsToText(rows) {
  return rows.map(cleanPanel).filter((row) => row.trim() !== "").join("\n");
}

/** rows with the row at `from` moved to `to` (a new array; out-of-range moves change nothing). */
export function movePanel(rows, from, to) {
  if (from === to || from < 0 || to < 0 || from >= rows.length || to >= rows.length) return [...rows];
  const out = [...rows];
  const [row] = out.splice(from, 1);
  out.splice(to, 0, row);
  return out;
}

/** rows with `row` inserted at `index` (default: at the end). */
export function insertPanel(rows, index = rows.length, row = "") {
  const out = [...rows];
  out.splice(Math.max(0, Math.min(index, rows.length)), 0, row);
  return out;
}

/** rows without the row at `index`. */
export function removePanel(rows, index) {
  return rows.filter((_, i) => i !== index);
}

/** Text pasted into row `index` at the caret: several lines become several rows. The row's text
 *  before/after the caret (`before`, `after`) stays with the first/last pasted line. */
export function pasteIntoPanel(rows, index, before, pasted, after) {
  const lines = String(pasted).split(/\r\n|\r|\n/);
  if (lines.length === 1) {
    const out = [...rows];
    out[index] = before + lines[0] + after;
    return out;
  }
  lines[0] = before + lines[0];
  lines[lines.length - 1] += after;
  const kept = lines.filter((l, i) => i === 0 || l.trim() !== "");
  return [...rows.slice(0, index), ...kept, ...rows.slice(index + 1)];
}
