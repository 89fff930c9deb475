// The status widget under a NextStep node's widgets: the cost line of its size (text from the
// presets module) and, while the node runs, tokens done/total, tokens/s and ETA (on the storyboard
// node also the panel it draws, and an ETA for all its panels), from the server's messages.
import * as L from "./nextstep_logic.js";
import { addPanelWidget, el, isLinked, TAG } from "./nextstep_frontend.js";

export class StatusLine {
  constructor(ui) {
    this.ui = ui;
    this.node = ui.node;
    this.listeners = []; // remove the api listeners
    this.phase = "idle";
    this.tracker = L.newTracker();
    this.startedAt = null;
    this.finishedAt = null;
    this.timer = null;
  }

  attach() {
    const { kind } = this.ui;
    const box = el("div", "nextstep-status");
    this.sizeLine = el("div", "ns-size");
    this.runLine = el("div", "ns-run");
    // the lines this node has: the size line where it has a size, the run line where it samples;
    // the run line is reserved even when idle, so a run never resizes the node
    const lines = [];
    if (kind.size) lines.push(this.sizeLine);
    if (kind.run !== false) lines.push(this.runLine);
    box.append(...lines);
    const height = 4 + 19 * lines.length;
    this.widget = addPanelWidget(this.node, "nextstep_status", box, {
      margin: 3, getMinHeight: () => height, getMaxHeight: () => height,
    });
    this.ui.track(this.widget);
    this.listen();
    return true;
  }

  key() {
    return "";
  }

  refresh() {
    this.paint();
  }

  paint() {
    const size = this.ui.costText();
    this.sizeLine.textContent = size;
    this.sizeLine.title = size;
    this.runLine.textContent = this.runText();
  }

  runText() {
    const now = performance.now();
    const end = this.finishedAt ?? now;
    const elapsed = this.startedAt === null ? null : (end - this.startedAt) / 1000;
    if (this.ui.kind.panels) {
      return L.storyboardStatusText(this.phase, L.storyboardStats(this.tracker, this.runPanels, now), elapsed);
    }
    return L.statusText(this.phase, L.progressStats(this.tracker, now), elapsed);
  }

  /** Whether a message's node id is this node (in a subgraph: "parent:...:id"). */
  isMe(id) {
    if (id === null || id === undefined) return false;
    const mine = String(this.node.id);
    const s = String(id);
    const root = this.ui.app.rootGraph ?? this.ui.app.graph;
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
    this.ui.api.addEventListener(type, wrapped);
    this.listeners.push(() => this.ui.api.removeEventListener(type, wrapped));
  }

  /** Called when the node is removed from its graph: no listener or timer outlives it. */
  unlisten() {
    this.stopTimer();
    for (const remove of this.listeners.splice(0)) remove();
  }

  /** Subscribe to the server's execution messages (once; again after unlisten()). */
  listen() {
    if (this.listeners.length || this.ui.kind.run === false) return;
    const running = () => this.phase === "starting" || this.phase === "running";
    this.on("executing", (detail) => {
      const id = detail && typeof detail === "object" ? detail.node : detail;
      if (this.isMe(id)) this.start();
      else if (running()) this.finish("done");
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
        if (running()) this.finish("stopped");
      });
    }
    this.on("execution_success", () => {
      if (running()) this.finish("done");
    });
  }

  /** How many panels the storyboard was queued with: its panels text (blank lines skipped, as
   *  the node does), or null when a link provides them. */
  queuedPanels() {
    const raw = this.ui.widget("panels");
    if (!raw || isLinked(this.node, "panels")) return null;
    return L.panelsFromText(raw.value).length || null;
  }

  start() {
    if (this.ui.kind.panels) this.runPanels = this.queuedPanels();
    this.phase = "starting";
    this.tracker = L.newTracker();
    this.startedAt = performance.now();
    this.finishedAt = null;
    this.stopTimer();
    this.timer = setInterval(() => this.paint(), 1000);
    this.paint();
  }

  progress(value, max) {
    if (!Number.isFinite(value) || !Number.isFinite(max) || max <= 0) return;
    if (this.phase !== "running" && this.phase !== "starting") this.start();
    this.phase = "running";
    this.tracker = L.trackProgress(this.tracker, value, max, performance.now());
    this.paint();
  }

  finish(phase) {
    this.phase = phase;
    this.finishedAt = performance.now();
    this.stopTimer();
    this.paint();
  }

  stopTimer() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  executed() {
    if (this.phase === "starting" || this.phase === "running") this.finish("done");
  }
}
