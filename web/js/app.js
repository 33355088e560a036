// The studio page (index.html): wires the DOM to the Studio, the params panel and the tools.

import { Api, ApiError, currentToken, saveToken, takeTokenFromUrl } from "./api.js";
import { RESOLUTIONS, listCameras } from "./camera.js";
import { ParamsForm } from "./controls.js";
import {
  OutputRecorder,
  copyText,
  download,
  formatDuration,
  recordingSupported,
  shareUrl,
} from "./recorder.js";
import { Studio } from "./studio.js";
import { $, MessageBar, showServerStatus, store, stored, toggleFullscreen, typingIn } from "./ui.js";

const HEALTH_INTERVAL_MS = 5000;
const PIPELINE_RETRY_MS = 3000;
const MIRROR_KEY = "livediff.mirror";

class StudioPage {
  constructor() {
    this.api = new Api();
    this.messages = new MessageBar($("#message"));
    this.inputVideo = $("#input-video");
    this.outputVideo = $("#output-video");
    this.statsList = $("#stats");
    this.form = null;
    this.recorder = null;
    this.studio = new Studio(this.api, this);
  }

  async init() {
    takeTokenFromUrl();
    this.fillResolutions();
    this.bind();
    this.setMirror(stored(MIRROR_KEY, "true") !== "false");
    this.onState("idle");
    await Promise.all([this.loadPipeline(), this.refreshCameras()]);
    this.pollHealth();
  }

  // -- the view the Studio talks to ----------------------------------------------------------
  cameraChoice() {
    const resolution = RESOLUTIONS.find((r) => r.id === $("#resolution").value) ?? RESOLUTIONS[0];
    return { deviceId: $("#camera").value, resolution };
  }

  initialParams() {
    this.form?.flush();
    return this.form ? this.form.changedFromDefaults() : {};
  }

  onState(state) {
    document.body.dataset.state = state;
    const busy = ["starting", "connecting", "reconnecting", "stopping"].includes(state);
    $("#start").disabled = state !== "idle";
    $("#stop").disabled = state === "idle" || state === "stopping";
    $("#record").disabled = !(state === "live" && recordingSupported());
    $("#share").disabled = state !== "live";
    $("#output-placeholder").hidden = state !== "idle";
    $("#output-busy").hidden = !busy;
    $(".busy-text").textContent = {
      starting: "Opening the camera…",
      connecting: "Connecting…",
      reconnecting: "Reconnecting…",
      stopping: "Stopping…",
    }[state] ?? "";
    this.statsList.hidden = state !== "live" || $("#stats-toggle").getAttribute("aria-pressed") !== "true";
    $("#apply-hint").textContent =
      state === "live" ? "Changes apply live, no restart." : "Changes apply when you press Start.";
    if (state !== "live") this.hideShare();
    if (state === "live" || state === "idle") this.checkHealth();
  }

  onCameraOpened() {
    this.refreshCameras();
  }

  onOutputLost() {
    this.finishRecording();
  }

  async onTeardown() {
    await this.finishRecording();
  }

  onStatsTick() {
    if (this.recorder) $("#rec-time").textContent = formatDuration(this.recorder.elapsedS);
  }

  openTokenDialog() {
    $("#token-input").value = currentToken();
    $("#token-dialog").showModal();
    $("#token-input").focus();
  }

  // -- setup ------------------------------------------------------------------------------------
  fillResolutions() {
    const select = $("#resolution");
    for (const resolution of RESOLUTIONS) select.add(new Option(resolution.label, resolution.id));
  }

  async refreshCameras() {
    const select = $("#camera");
    const chosen = select.value;
    const cameras = await listCameras();
    const options = cameras.map((camera) => new Option(camera.label, camera.deviceId));
    select.replaceChildren(new Option("Default camera", ""), ...options);
    if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
  }

  async loadPipeline() {
    let pipeline;
    let complained = false;
    while (!pipeline) {
      try {
        pipeline = await this.api.pipeline();
      } catch (error) {
        // The server is down or starting: say so, and keep asking until it answers.
        showServerStatus($("#server-status"), "unreachable");
        this.messages.show(error.message, { kind: error.status === 0 ? "error" : "warning" });
        complained = true;
        await new Promise((resolve) => setTimeout(resolve, PIPELINE_RETRY_MS));
      }
    }
    if (complained) this.messages.show("Connected to the server.", { kind: "success", autoHideMs: 2500 });
    $("#pipeline-name").textContent = pipeline.name;
    document.title = `livediff · ${pipeline.name}`;
    const { width, height } = pipeline.defaults ?? {};
    if (width && height) $("#output-screen").style.setProperty("--output-aspect", `${width} / ${height}`);
    this.form = new ParamsForm($("#params-form"), pipeline);
    this.form.addEventListener("change", (event) => this.studio.sendParams(event.detail));
    document.body.dataset.pipeline = pipeline.name;
  }

  pollHealth() {
    this.checkHealth();
    setInterval(() => this.checkHealth(), HEALTH_INTERVAL_MS);
  }

  async checkHealth() {
    try {
      showServerStatus($("#server-status"), await this.api.health());
    } catch (error) {
      showServerStatus($("#server-status"), error instanceof ApiError ? "unreachable" : "unknown");
    }
  }

  bind() {
    $("#start").addEventListener("click", () => this.studio.start());
    $("#stop").addEventListener("click", () => this.studio.stop());
    $("#record").addEventListener("click", () => this.toggleRecording());
    $("#share").addEventListener("click", () => this.toggleShare());
    $("#fullscreen").addEventListener("click", () => this.fullscreen());
    $("#stats-toggle").addEventListener("click", () => this.toggleStats());
    $("#reset").addEventListener("click", () => this.form?.reset());
    $("#mirror").addEventListener("change", () => this.setMirror($("#mirror").checked));
    $("#token-button").addEventListener("click", () => this.openTokenDialog());
    $("#token-dialog").addEventListener("close", () => this.onTokenDialogClosed());
    $("#params-form").addEventListener("submit", (event) => event.preventDefault());
    $("#params-form").addEventListener("keydown", (event) => this.onFormKey(event));
    for (const id of ["#camera", "#resolution"]) {
      $(id).addEventListener("change", () => this.onCameraChoice());
    }
    this.outputVideo.addEventListener("resize", () => this.fitOutput());
    document.addEventListener("keydown", (event) => this.onShortcut(event));
    document.addEventListener("dragover", (event) => this.onDragOver(event));
    document.addEventListener("drop", (event) => this.onDrop(event));
    window.addEventListener("pagehide", () => this.studio.closeOnUnload());
  }

  // -- actions ----------------------------------------------------------------------------------
  async onCameraChoice() {
    try {
      await this.studio.switchCamera();
    } catch (error) {
      this.messages.show(error.message);
    }
  }

  onFormKey(event) {
    // Ctrl/Cmd+Enter in the prompt sends it at once instead of after the typing pause.
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      event.target.dispatchEvent(new Event("change", { bubbles: true }));
    }
  }

  /** A file dragged over the page: it may be dropped when the panel takes one (a style image). */
  onDragOver(event) {
    if (event.defaultPrevented || !this.form?.fileField()) return;
    if (!event.dataTransfer?.types.includes("Files")) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  }

  onDrop(event) {
    const file = event.dataTransfer?.files?.[0];
    if (event.defaultPrevented || !file || !this.form?.fileField()) return;
    event.preventDefault();
    this.form.takeFile(file);
  }

  onShortcut(event) {
    if (typingIn(event) || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "f") this.fullscreen();
    else if (event.key === "i") this.toggleStats();
  }

  onTokenDialogClosed() {
    const choice = $("#token-dialog").returnValue;
    if (choice === "save") saveToken($("#token-input").value.trim());
    if (choice === "clear") saveToken("");
    if (choice === "save" || choice === "clear") {
      this.messages.show(choice === "save" ? "Token saved." : "Token forgotten.", {
        kind: "success",
        autoHideMs: 2500,
      });
    }
  }

  fullscreen() {
    toggleFullscreen($("#output-screen")).catch((error) => {
      this.messages.show(`Fullscreen is not available: ${error.message}`, { kind: "warning", autoHideMs: 4000 });
    });
  }

  /** Mirrors both videos (as a mirror would), remembered for the next visit. */
  setMirror(on) {
    $("#mirror").checked = on;
    document.body.dataset.mirror = String(on);
    store(MIRROR_KEY, String(on));
  }

  toggleStats() {
    const button = $("#stats-toggle");
    const show = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(show));
    this.statsList.hidden = !show || !this.studio.live;
  }

  fitOutput() {
    const { videoWidth, videoHeight } = this.outputVideo;
    if (videoWidth && videoHeight) {
      $("#output-screen").style.setProperty("--output-aspect", `${videoWidth} / ${videoHeight}`);
    }
  }

  async toggleRecording() {
    if (this.recorder) {
      await this.finishRecording();
      return;
    }
    try {
      this.recorder = new OutputRecorder(this.outputVideo.srcObject);
      this.recorder.start();
    } catch (error) {
      this.recorder = null;
      this.messages.show(`Recording is not available in this browser: ${error.message}`);
      return;
    }
    $("#record").setAttribute("aria-pressed", "true");
    $(".record-label").textContent = "Stop recording";
    $("#rec-time").textContent = "00:00";
    $("#rec-indicator").hidden = false;
  }

  /** Stops a running recording and downloads it (also when the session ends). */
  async finishRecording() {
    const recorder = this.recorder;
    if (!recorder) return;
    this.recorder = null;
    $("#record").setAttribute("aria-pressed", "false");
    $(".record-label").textContent = "Record";
    $("#rec-indicator").hidden = true;
    try {
      const { blob, filename } = await recorder.stop();
      download(blob, filename);
    } catch (error) {
      this.messages.show(`The recording could not be saved: ${error.message}`);
    }
  }

  async toggleShare() {
    const panel = $("#share-panel");
    if (!panel.hidden) return this.hideShare();
    const session = this.studio.session;
    if (!session?.id) return;
    const url = shareUrl(session.id);
    $("#share-url").value = url;
    $("#share-open").href = url;
    panel.hidden = false;
    $("#share").setAttribute("aria-expanded", "true");
    $("#share-url").select();
    if (await copyText(url)) {
      this.messages.show("Viewer link copied to the clipboard.", { kind: "success", autoHideMs: 2500 });
    }
  }

  hideShare() {
    $("#share-panel").hidden = true;
    $("#share").setAttribute("aria-expanded", "false");
  }
}

const page = new StudioPage();
window.livediff = page;
page.init();
