// Pure logic of the graph-editor extension (web/nextstep_logic.js). Run: node --test tests/web/
import { test } from "node:test";
import assert from "node:assert/strict";

import * as L from "../../web/nextstep_logic.js";

const AT_512 = [
  [256, 1024], [288, 896], [320, 800], [352, 736], [384, 672], [416, 608], [448, 576], [480, 544], [512, 512],
]; // (h, w) from the model's spec; the other eight buckets are their transposes

test("buckets at 512 are the official sizes, landscape first, then their transposes", () => {
  const sizes = L.bucketSizes(512).map((s) => [s.height, s.width]);
  const expected = [...AT_512, ...AT_512.slice(0, 8).reverse().map(([h, w]) => [w, h])];
  assert.deepEqual(sizes, expected);
  assert.equal(sizes.length, 17);
});

test("bucket sizes scale with the base and are multiples of 16", () => {
  for (const base of [256, 384, 512, 768, 1024]) {
    for (const { width, height } of L.bucketSizes(base)) {
      assert.equal(width % 16, 0);
      assert.equal(height % 16, 0);
    }
  }
  assert.deepEqual(L.bucketSizes(256)[8], { width: 256, height: 256 });
  assert.deepEqual(L.bucketSizes(1024)[0], { width: 2048, height: 512 });
});

test("rounding is half-to-even like Python's round(), so sizes match the engine", () => {
  assert.equal(L.roundHalfEven(16.5), 16);
  assert.equal(L.roundHalfEven(13.5), 14);
  assert.equal(L.roundHalfEven(2.5), 2);
  assert.equal(L.roundHalfEven(2.51), 3);
  assert.equal(L.roundHalfEven(-0.5), 0);
  // base 384: (11, 23) -> round(16.5)=16, round(34.5)=34 tokens (Math.round would give 17 and 35)
  const b = L.bucketSizes(384)[3];
  assert.deepEqual(b, { width: 34 * 16, height: 16 * 16 });
});

test("preset labels name the pixel size and the nearest familiar ratio", () => {
  assert.equal(L.presetLabel(512, 512), "512×512 (1:1)");
  assert.equal(L.presetLabel(1024, 256), "1024×256 (4:1)");
  assert.equal(L.presetLabel(800, 320), "800×320 (5:2)");
  assert.equal(L.presetLabel(672, 384), "672×384 (≈16:9)");
  assert.equal(L.presetLabel(384, 672), "384×672 (≈9:16)");
  const options = L.presetOptions(512);
  assert.equal(options[0], L.CUSTOM);
  assert.equal(options.length, 18);
  assert.equal(new Set(options).size, 18, "labels are unique");
});

test("a preset label gives its size back at the same base", () => {
  for (const base of L.BASE_SIZES) {
    for (const label of L.presetOptions(base).slice(1)) {
      const size = L.presetSize(label, base);
      assert.ok(size, label);
      assert.equal(L.presetLabel(size.width, size.height), label);
    }
  }
  assert.equal(L.presetSize(L.CUSTOM), null);
  assert.equal(L.presetSize("nonsense"), null);
});

test("matchPreset finds the base a size is a bucket of, preferring the current base", () => {
  assert.deepEqual(L.matchPreset(512, 512), { base: 512, label: "512×512 (1:1)" });
  assert.deepEqual(L.matchPreset(1024, 1024), { base: 1024, label: "1024×1024 (1:1)" });
  assert.deepEqual(L.matchPreset(256, 256, 1024), { base: 256, label: "256×256 (1:1)" });
  assert.deepEqual(L.matchPreset(608, 416), { base: 512, label: "608×416 (≈3:2)" });
  assert.equal(L.matchPreset(500, 500), null);
  assert.equal(L.matchPreset(512, 528), null);
});

test("snapping goes to the nearest multiple of 16 inside the widget's limits", () => {
  assert.equal(L.snapToMultiple(512), 512);
  assert.equal(L.snapToMultiple(500), 496);
  assert.equal(L.snapToMultiple(505), 512);
  assert.equal(L.snapToMultiple(504), 512); // 31.5 tokens -> 32 (half to even)
  assert.equal(L.snapToMultiple(520), 512); // 32.5 tokens -> 32
  assert.equal(L.snapToMultiple(3), 16);
  assert.equal(L.snapToMultiple(-40), 16);
  assert.equal(L.snapToMultiple(5000, { max: 2048 }), 2048);
  assert.equal(L.snapToMultiple(100, { min: 250 }), 256, "min is rounded inwards");
  assert.equal(L.snapToMultiple(3000, { max: 2040 }), 2032, "max is rounded inwards");
  assert.equal(L.snapToMultiple("640"), 640);
  assert.equal(L.snapToMultiple(NaN), 16);
  assert.equal(L.snapToMultiple(undefined, { min: 64 }), 64);
});

test("token count is (H/16)*(W/16)", () => {
  assert.equal(L.tokenCount(512, 512), 1024);
  assert.equal(L.tokenCount(1024, 256), 1024);
  assert.equal(L.tokenCount(1024, 1024), 4096);
  assert.equal(L.tokenCount(544, 480), 34 * 30);
  // at base 512 each bucket (h, w) is a 2h x 2w token grid: every preset costs about 1024 tokens
  L.bucketSizes(512).forEach(({ width, height }, i) => {
    const [h, w] = L.BUCKETS[i];
    assert.equal(L.tokenCount(width, height), 4 * h * w);
  });
});

test("the size summary shows grid, tokens, the multiplier and off-bucket sizes", () => {
  assert.equal(L.sizeSummary(512, 512, { preset: L.matchPreset(512, 512) }), "512×512 · 32×32 grid · 1,024 tokens");
  assert.equal(
    L.sizeSummary(512, 512, { count: 4, unit: "panels", preset: {} }),
    "512×512 · 32×32 grid · 1,024 tokens × 4 panels = 4,096",
  );
  assert.equal(L.sizeSummary(528, 512), "528×512 · 33×32 grid · 1,056 tokens · not a training bucket");
  assert.equal(L.sizeSummary(512, 512, { per: "panel", preset: {} }), "512×512 · 32×32 grid · 1,024 tokens per panel");
  assert.equal(
    L.sizeSummary(528, 512, { per: "panel", count: 3 }),
    "528×512 · 33×32 grid · 1,056 tokens per panel · not a training bucket",
    "per wins over a count",
  );
  assert.equal(L.formatCount(1234567), "1,234,567");
  assert.equal(L.formatCount(999), "999");
});

test("rate and ETA come from the timestamps of progress values", () => {
  let tr = L.newTracker();
  assert.deepEqual(L.progressStats(tr).rate, null);
  // 10 tokens per second: value v at t = 100 * v ms
  for (let v = 1; v <= 50; v++) tr = L.trackProgress(tr, v, 1024, 1000 + 100 * v);
  const s = L.progressStats(tr);
  assert.equal(s.value, 50);
  assert.equal(s.max, 1024);
  assert.ok(Math.abs(s.rate - 10) < 1e-9);
  assert.ok(Math.abs(s.eta - 97.4) < 1e-9);
  assert.ok(Math.abs(s.average - 10) < 1e-9);
  // between messages the ETA counts down with the clock, never below 0
  assert.ok(Math.abs(L.progressStats(tr, tr.lastT + 2000).eta - 95.4) < 1e-9);
  assert.equal(L.progressStats(tr, tr.lastT + 1e9).eta, 0);
});

test("the rate follows a real change of speed", () => {
  let tr = L.newTracker();
  let t = 0;
  for (let v = 1; v <= 300; v++) tr = L.trackProgress(tr, v, 3000, (t += 100)); // 10 tok/s for 30 s
  for (let v = 301; v <= 1500; v++) tr = L.trackProgress(tr, v, 3000, (t += 25)); // then 40 tok/s for 30 s
  const s = L.progressStats(tr);
  assert.ok(Math.abs(s.rate - 40) < 1, `windowed rate ${s.rate}`);
  assert.ok(s.average > 10 && s.average < 40, "the average covers the whole pass");
  assert.ok(tr.samples.length < 1500, "old samples are dropped");
  assert.ok(tr.samples[0].t <= t - 29900, "the window spans the later half of the pass");
});

test("pauses for live previews do not make the rate jump", () => {
  // 10 tok/s, with a 3 s pause every 5 s of work: 6.25 tok/s on average, 320 s in all
  let tr = L.newTracker();
  let t = 0;
  for (let v = 1; v <= 2000; v++) {
    t += 100 + (v % 50 === 0 ? 3000 : 0);
    tr = L.trackProgress(tr, v, 2000, t);
    const { rate } = L.progressStats(tr);
    if (t > 32000) assert.ok(Math.abs(rate / 6.25 - 1) < 0.15, `${rate} tok/s at ${t} ms`);
  }
});

test("sparse, throttled messages still give a rate", () => {
  let tr = L.newTracker();
  tr = L.trackProgress(tr, 1, 1024, 0);
  assert.equal(L.progressStats(tr).rate, null);
  assert.equal(L.progressStats(tr).eta, null);
  tr = L.trackProgress(tr, 201, 1024, 30000); // the next one 30 s later (> window)
  assert.ok(Math.abs(L.progressStats(tr).rate - 200 / 30) < 1e-9);
});

test("a repeated value is ignored; a smaller value or another max starts a new pass", () => {
  let tr = L.newTracker();
  tr = L.trackProgress(tr, 10, 100, 0);
  tr = L.trackProgress(tr, 20, 100, 1000);
  const same = L.trackProgress(tr, 20, 100, 1500);
  assert.equal(same, tr, "duplicate (progress + progress_state) changes nothing");
  tr = L.trackProgress(tr, 3, 100, 2000);
  assert.equal(tr.resets, 1);
  assert.equal(tr.samples.length, 1);
  assert.equal(L.progressStats(tr).rate, null);
  tr = L.trackProgress(tr, 5, 200, 2100);
  assert.equal(tr.resets, 2);
  assert.equal(tr.max, 200);
  const done = L.trackProgress(L.trackProgress(L.newTracker(), 1, 4, 0), 4, 4, 300);
  assert.equal(L.progressStats(done).eta, 0);
});

test("durations and rates format for a status line", () => {
  assert.equal(L.formatDuration(0), "0:00");
  assert.equal(L.formatDuration(7.4), "0:07");
  assert.equal(L.formatDuration(59.6), "1:00");
  assert.equal(L.formatDuration(754), "12:34");
  assert.equal(L.formatDuration(3723), "1:02:03");
  assert.equal(L.formatDuration(null), "—");
  assert.equal(L.formatDuration(Infinity), "—");
  assert.equal(L.formatRate(3.14159), "3.14");
  assert.equal(L.formatRate(35.24), "35.2");
  assert.equal(L.formatRate(1234.4), "1,234");
  assert.equal(L.formatRate(null), "—");
});

test("status text for each phase", () => {
  let tr = L.newTracker();
  tr = L.trackProgress(tr, 100, 1024, 0);
  tr = L.trackProgress(tr, 412, 1024, 10000);
  const stats = L.progressStats(tr);
  assert.equal(L.statusText("idle", stats), "");
  assert.equal(L.statusText("starting", L.progressStats(L.newTracker()), 3.2), "preparing… 0:03");
  assert.equal(L.statusText("running", stats), "412/1,024 tokens · 31.2 tok/s · ETA 0:20");
  assert.equal(L.statusText("stopped", stats), "stopped at 412/1,024 tokens");
  assert.equal(L.statusText("stopped", L.progressStats(L.newTracker())), "stopped");
  tr = L.trackProgress(tr, 1024, 1024, 30000);
  assert.equal(L.statusText("done", L.progressStats(tr), 31.6), "done · 1,024 tokens · 0:32 · 30.8 tok/s");
  tr = L.trackProgress(tr, 1, 1024, 31000);
  assert.match(L.statusText("running", L.progressStats(tr)), /^1\/1,024 tokens \(pass 2\)/);
});

/** A storyboard run as the server reports it: `panels` panels of `max` tokens, 10 tokens per
 *  second, progress restarting at 1 for each panel, with a 2 s pause between panels. */
function storyboardRun(panels, max, until = Infinity) {
  let tr = L.newTracker();
  let t = 0;
  for (let p = 1; p <= panels; p++) {
    t += 2000;
    for (let v = 1; v <= max; v++) {
      if ((p - 1) * max + v > until) return { tr, t };
      tr = L.trackProgress(tr, v, max, (t += 100));
    }
  }
  return { tr, t };
}

test("a new pass keeps the last rate of the one before", () => {
  const { tr } = storyboardRun(2, 100, 101);
  assert.equal(tr.resets, 1);
  assert.equal(L.progressStats(tr).rate, null, "the new pass has no rate of its own yet");
  assert.ok(Math.abs(tr.prevRate - 10) < 1e-9);
  assert.equal(L.newTracker().prevRate, null);
});

test("storyboard stats: panel k of n, and an ETA over the remaining panels", () => {
  // panel 1 of 3, 50 of 100 tokens: 50 + 2 x 100 tokens left at 10 tok/s
  let s = L.storyboardStats(storyboardRun(3, 100, 50).tr, 3);
  assert.equal(s.panel, 1);
  assert.equal(s.panels, 3);
  assert.ok(Math.abs(s.rate - 10) < 1e-9);
  assert.ok(Math.abs(s.eta - 25) < 1e-9);
  // the first token of panel 2: the rate of panel 1 stands in; 99 + 100 tokens left
  const { tr } = storyboardRun(3, 100, 101);
  s = L.storyboardStats(tr, 3);
  assert.equal(s.panel, 2);
  assert.ok(Math.abs(s.rate - 10) < 1e-9);
  assert.ok(Math.abs(s.eta - 19.9) < 1e-9);
  assert.ok(Math.abs(L.storyboardStats(tr, 3, tr.lastT + 5000).eta - 14.9) < 1e-9, "counts down with the clock");
  // the end of panel 2 still has panel 3 to go; the end of the last panel has nothing
  assert.ok(Math.abs(L.storyboardStats(storyboardRun(3, 100, 200).tr, 3).eta - 10) < 1e-9);
  assert.equal(L.storyboardStats(storyboardRun(3, 100).tr, 3).eta, 0);
  // unknown count (a linked input) or fewer panels than already drawn: this panel only
  s = L.storyboardStats(storyboardRun(3, 100, 150).tr, null);
  assert.equal(s.panel, 2);
  assert.equal(s.panels, null);
  assert.ok(Math.abs(s.eta - 5) < 1e-9);
  assert.equal(L.storyboardStats(storyboardRun(3, 100, 250).tr, 2).panels, null);
  // before any progress
  s = L.storyboardStats(L.newTracker(), 4);
  assert.equal(s.panel, 1);
  assert.equal(s.eta, null);
});

test("storyboard status text for each phase", () => {
  const at = (until, panels = 4) => L.storyboardStats(storyboardRun(4, 1024, until).tr, panels);
  assert.equal(L.storyboardStatusText("running", at(1024 + 412)), "panel 2/4 · 412/1,024 tokens · 10.0 tok/s · ETA 4:26");
  assert.equal(
    L.storyboardStatusText("running", at(1024 + 412, null)),
    "panel 2 · 412/1,024 tokens · 10.0 tok/s · panel ETA 1:01",
  );
  assert.equal(L.storyboardStatusText("stopped", at(1024 + 412)), "stopped at panel 2/4 · 412/1,024 tokens");
  assert.equal(L.storyboardStatusText("done", at(4096), 420.4), "done · 4 panels × 1,024 tokens · 7:00 · 10.0 tok/s");
  assert.equal(
    L.storyboardStatusText("done", L.storyboardStats(storyboardRun(1, 16).tr, 1), 3),
    "done · 1 panel × 16 tokens · 0:03 · 10.0 tok/s",
  );
  const none = L.storyboardStats(L.newTracker(), 4);
  assert.equal(L.storyboardStatusText("idle", none), "");
  assert.equal(L.storyboardStatusText("starting", none, 3.2), "preparing… 0:03");
  assert.equal(L.storyboardStatusText("stopped", none), "stopped");
  assert.equal(L.storyboardStatusText("done", none, 1), "done · 0:01");
});

test("reasoning text is read from the executed message's ui output", () => {
  assert.equal(L.reasoningFromOutput({ reasoning: ["The cat sits left."] }), "The cat sits left.");
  assert.equal(L.reasoningFromOutput({ reasoning: [""] }), "");
  assert.equal(L.reasoningFromOutput({ reasoning: "plain" }), "plain");
  assert.equal(L.reasoningFromOutput({ images: [] }), "");
  assert.equal(L.reasoningFromOutput(null), "");
  assert.equal(L.reasoningFromOutput({ reasoning: ["a", " ", "b"] }), "a\n\n———\n\nb");
});

test("panel text -> rows: one per non-blank line, kept as written", () => {
  assert.deepEqual(L.panelsFromText("a cat\n\n  \na dog on a bench\r\nthe end"), ["a cat", "a dog on a bench", "the end"]);
  assert.deepEqual(L.panelsFromText(""), []);
  assert.deepEqual(L.panelsFromText(undefined), []);
  assert.deepEqual(L.panelsFromText(" leading space kept"), [" leading space kept"]);
});

test("rows -> text: blank rows dropped, line breaks inside a row become spaces", () => {
  assert.equal(L.panelsToText(["a", "", "  ", "b"]), "a\nb");
  assert.equal(L.panelsToText(["two\nlines", "three\r\n\r\nmore"]), "two lines\nthree more");
  assert.equal(L.panelsToText([]), "");
});

test("panel text round-trips through the editor", () => {
  const texts = ["panel one\npanel two\npanel three", "single", "", "x, y, z\nwith, commas; and: marks"];
  for (const t of texts) assert.equal(L.panelsToText(L.panelsFromText(t)), t);
  const rows = ["first", "", "second", "third\nfourth"];
  assert.deepEqual(L.panelsFromText(L.panelsToText(rows)), ["first", "second", "third fourth"]);
  // text with blank lines normalises once, then is stable
  const once = L.panelsToText(L.panelsFromText("a\n\n\nb\n"));
  assert.equal(once, "a\nb");
  assert.equal(L.panelsToText(L.panelsFromText(once)), once);
});

test("add, remove and reorder rows without touching the input array", () => {
  const rows = ["a", "b", "c"];
  assert.deepEqual(L.movePanel(rows, 0, 2), ["b", "c", "a"]);
  assert.deepEqual(L.movePanel(rows, 2, 1), ["a", "c", "b"]);
  assert.deepEqual(L.movePanel(rows, 0, -1), ["a", "b", "c"]);
  assert.deepEqual(L.movePanel(rows, 2, 3), ["a", "b", "c"]);
  assert.deepEqual(L.insertPanel(rows), ["a", "b", "c", ""]);
  assert.deepEqual(L.insertPanel(rows, 1, "x"), ["a", "x", "b", "c"]);
  assert.deepEqual(L.insertPanel(rows, 99, "z"), ["a", "b", "c", "z"]);
  assert.deepEqual(L.removePanel(rows, 1), ["a", "c"]);
  assert.deepEqual(L.removePanel(rows, 5), ["a", "b", "c"]);
  assert.deepEqual(rows, ["a", "b", "c"]);
});

test("pasting several lines into a row makes several rows", () => {
  const rows = ["one", "tw|o", "three"];
  assert.deepEqual(L.pasteIntoPanel(rows, 1, "tw", "X\nY\n\nZ", "o"), ["one", "twX", "Y", "Zo", "three"]);
  assert.deepEqual(L.pasteIntoPanel(rows, 1, "tw", "single", "o"), ["one", "twsingleo", "three"]);
  assert.deepEqual(L.pasteIntoPanel([""], 0, "", "a\r\nb\n", ""), ["a", "b"], "blank pasted lines are dropped");
  assert.deepEqual(L.pasteIntoPanel(["x"], 0, "", "\na", "x"), ["", "ax"], "the first row stays, even blank");
  assert.equal(L.panelsToText(L.pasteIntoPanel([""], 0, "", "a\r\nb\n", "")), "a\nb");
});

test("editSummary: the fitting rule before a run, the fitted size after one", () => {
  assert.equal(L.editSummary({ fit: "bucket", size: 512 }), "≈512×512 at the input's aspect · ≈1,024 tokens");
  assert.equal(L.editSummary({ fit: "resize", size: 768 }), "≈768×768 at the input's aspect · ≈2,304 tokens");
  assert.equal(L.editSummary({ fit: "center-crop", size: 256 }), "256×256, the centre square of the input · 256 tokens");
  assert.equal(L.editSummary({ fit: "none", size: 512 }), "the input's own size (its sides must be multiples of 16)");
  assert.equal(L.editSummary({ fit: "bucket", size: Number.NaN }), "");
  const last = { width: 672, height: 384, images: 1 };
  assert.equal(L.editSummary({ fit: "bucket", size: 512, last }), "last input → 672×384 · 42×24 grid · 1,008 tokens");
  assert.equal(L.editSummary({ size: 512, last: { ...last, images: 2 } }),
    "last input → 672×384 · 42×24 grid · 1,008 tokens × 2 images = 2,016");
});

test("fittedFromOutput reads NextStep Edit's ui.fitted and nothing else", () => {
  assert.deepEqual(L.fittedFromOutput({ fitted: [544, 480, 2] }), { width: 544, height: 480, images: 2 });
  assert.deepEqual(L.fittedFromOutput({ fitted: [512, 512] }), { width: 512, height: 512, images: 1 });
  for (const bad of [undefined, {}, { fitted: [] }, { fitted: [512] }, { fitted: [512, "x"] }, { fitted: [0, 512] },
    { fitted: [512.5, 512] }, { images: [{ filename: "a.png" }] }]) {
    assert.equal(L.fittedFromOutput(bad), null, JSON.stringify(bad));
  }
});
