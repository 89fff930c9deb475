// ComfyUI graph-editor extension for the NextStep nodes (plain ES modules, no build step):
//  - nextstep_presets.js: aspect presets (the official training buckets) that set width/height,
//    sizes snapped to multiples of 16, and the image-token cost shown under the widgets;
//  - nextstep_status.js: a live status line while a NextStep node runs (tokens, tokens/s, ETA);
//  - nextstep_reasoning.js: the Self-CoT reasoning of the last run on the text-to-image node;
//  - nextstep_panels.js: a storyboard panel editor that writes the node's own `panels` text;
//  - nextstep_node.js ties them to one node; nextstep_frontend.js is all it asks of the frontend;
//    nextstep_logic.js is the pure part (no DOM), tested on its own.
// Everything it adds is left out of widgets_values and of the queued prompt, so workflows saved
// with it load unchanged without it; if anything here fails, the nodes keep their plain widgets.
// It behaves the same in the classic canvas and with Vue nodes.
import { chain, comfy, injectStyle, warn } from "./nextstep_frontend.js";
import { NodeUI } from "./nextstep_node.js";

const EXTENSION = "nextstep.ui";

// What each node gets. size: "wh" (width/height + aspect presets) or "base" (the edit node's
// `size`), none for a node without a size line; count: the widget whose value multiplies the
// token cost; per: the cost is shown "per <per>" (Story Start cannot know how many panels follow
// it); run: false for a node without a run line (Story Start samples nothing).
const KINDS = {
  NextStepTextToImage: { size: "wh", count: "batch_size", unit: "images", reasoning: true },
  NextStepEdit: { size: "base" },
  NextStepStoryboard: { size: "wh", panels: true, unit: "panels" },
  NextStepStoryStart: { size: "wh", per: "panel", run: false },
  NextStepStoryboardPanel: {},
};

function install(app, api) {
  app.registerExtension({
    name: EXTENSION,
    setup() {
      injectStyle();
    },
    beforeRegisterNodeDef(nodeType, nodeData) {
      const kind = KINDS[nodeData?.name];
      if (!kind) return;
      const proto = nodeType.prototype;
      chain(proto, "onNodeCreated", function () {
        injectStyle();
        const ui = new NodeUI(this, kind, app, api);
        try {
          ui.attach();
          this.nextstepUI = ui;
        } catch (err) {
          ui.detach();
          warn(`could not set up ${nodeData.name} #${this.id}`, err);
        }
      });
      chain(proto, "onConfigure", function () {
        this.nextstepUI?.refresh(true);
      });
      chain(proto, "onExecuted", function (output) {
        this.nextstepUI?.executed(output);
      });
      chain(proto, "onConnectionsChange", function () {
        this.nextstepUI?.refresh();
      });
      chain(proto, "onWidgetChanged", function () {
        this.nextstepUI?.refresh();
      });
      chain(proto, "onDrawForeground", function () {
        this.nextstepUI?.refresh();
      });
      chain(proto, "onAdded", function () {
        this.nextstepUI?.listen();
      });
      chain(proto, "onRemoved", function () {
        this.nextstepUI?.unlisten();
      });
    },
  });
}

try {
  const { app, api } = await comfy();
  install(app, api);
} catch (err) {
  warn("the extension did not load", err);
}
