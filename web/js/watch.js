// The viewer page (watch.html?session=ID): a session's restyled output over WHEP.

import { Api, ApiError, currentToken, saveToken, takeTokenFromUrl } from "./api.js";
import { StatsSampler, formatBitrate } from "./stats.js";
import { $, MessageBar, attach, toggleFullscreen, typingIn } from "./ui.js";
import { WhepViewer } from "./whep.js";

const MAX_RETRIES = 3;

class ViewerPage {
  constructor() {
    this.api = new Api();
    this.messages = new MessageBar($("#message"));
    this.video = $("#output-video");
    this.sessionId = new URL(location.href).searchParams.get("session") ?? "";
    this.viewer = null;
    this.retries = 0;
    this.statsTimer = null;
  }

  async init() {
    takeTokenFromUrl();
    $("#fullscreen").addEventListener("click", () => this.fullscreen());
    $("#token-button").addEventListener("click", () => this.askToken());
    $("#token-dialog").addEventListener("close", () => {
      if ($("#token-dialog").returnValue !== "save") return;
      saveToken($("#token-input").value.trim());
      this.watch();
    });
    document.addEventListener("keydown", (event) => {
      if (!typingIn(event) && event.key === "f") this.fullscreen();
    });
    window.addEventListener("pagehide", () => this.viewer?.close());
    if (!this.sessionId) {
      this.fail("This link names no session. Ask for a new share link from the livediff studio.");
      return;
    }
    this.iceServers = await this.api.iceServers();
    await this.watch();
  }

  async watch() {
    this.setBusy("Connecting…");
    this.messages.hide();
    const viewer = new WhepViewer(this.api, this.sessionId, { iceServers: this.iceServers });
    this.viewer = viewer;
    viewer.addEventListener("track", (event) => attach(this.video, event.detail));
    viewer.addEventListener("connected", () => this.onConnected(viewer));
    viewer.addEventListener("lost", (event) => this.onLost(viewer, event.detail));
    try {
      await viewer.open();
    } catch (error) {
      await viewer.close();
      this.onError(error);
    }
  }

  onConnected(viewer) {
    if (viewer !== this.viewer) return;
    this.retries = 0;
    this.setBusy(null);
    $("#live-badge").hidden = false;
    this.startStats(viewer);
  }

  onError(error) {
    if (error instanceof ApiError && error.status === 401) {
      this.fail("This server needs an access token to watch.", { label: "Enter token", handler: () => this.askToken() });
    } else if (error instanceof ApiError && error.status === 404) {
      this.fail("This session has ended (or the link is wrong). Ask for a new share link.");
    } else {
      this.fail(error.message || String(error), { label: "Try again", handler: () => this.watch() });
    }
  }

  async onLost(viewer, reason) {
    if (viewer !== this.viewer) return;
    clearInterval(this.statsTimer);
    $("#live-badge").hidden = true;
    if (this.retries >= MAX_RETRIES) {
      this.fail(`The stream stopped: ${reason}.`, { label: "Watch again", handler: () => this.watch() });
      return;
    }
    this.retries += 1;
    this.setBusy(`Reconnecting (${this.retries}/${MAX_RETRIES})…`);
    await new Promise((resolve) => setTimeout(resolve, 1000 * this.retries));
    if (viewer === this.viewer) await this.watch();
  }

  fail(text, action = null) {
    this.setBusy(null);
    attach(this.video, null);
    this.messages.show(text, { action });
  }

  setBusy(text) {
    $("#output-busy").hidden = !text;
    if (text) $(".busy-text").textContent = text;
  }

  askToken() {
    $("#token-input").value = currentToken();
    $("#token-dialog").showModal();
  }

  fullscreen() {
    toggleFullscreen($("#output-screen")).catch((error) => {
      this.messages.show(`Fullscreen is not available: ${error.message}`, { kind: "warning", autoHideMs: 4000 });
    });
  }

  startStats(viewer) {
    const sampler = new StatsSampler();
    clearInterval(this.statsTimer);
    this.statsTimer = setInterval(async () => {
      if (viewer.closed) return;
      try {
        const snapshot = sampler.sample(await viewer.pc.getStats(), null);
        const fps = snapshot.fpsOut === null ? "–" : snapshot.fpsOut.toFixed(0);
        $("#viewer-stats").textContent = `${fps} fps · ${formatBitrate(snapshot.bitrateIn)}`;
      } catch (error) {
        // The peer closed between two ticks; the "lost" path reports that.
        if (!viewer.closed) console.warn("livediff: stats failed:", error);
      }
    }, 1000);
  }
}

new ViewerPage().init();
