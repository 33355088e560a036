// The studio's session life: Start (camera, then session), live, lost and reconnecting, Stop.

import { ApiError, fieldError, formatDetail } from "./api.js";
import { openCamera, stopStream } from "./camera.js";
import { PublishSession } from "./rtc.js";
import { StatsSampler, renderStats } from "./stats.js";
import { attach } from "./ui.js";

export const MAX_RECONNECTS = 3;
const CONNECT_TIMEOUT_MS = 20_000;
const STABLE_AFTER_MS = 10_000;
const STATS_INTERVAL_MS = 1000;
const LOADING_POLL_MS = 1000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const sentence = (text) => (/[.!?…]$/.test(text) ? text : `${text}.`);

/**
 * Owns the camera stream and the current PublishSession. ``view`` is the page (app.js):
 * it gives the chosen camera and params and is told about state, messages and streams.
 * States: idle, starting, connecting, live, reconnecting, stopping.
 */
export class Studio {
  constructor(api, view) {
    this.api = api;
    this.view = view;
    this.state = "idle";
    this.camera = null;
    this.session = null;
    this.reconnects = 0;
    this.run = 0;
    this.statsTimer = null;
    this.stableTimer = null;
  }

  setState(state) {
    this.state = state;
    this.view.onState(state);
  }

  get live() {
    return this.state === "live";
  }

  async start() {
    if (this.state !== "idle") return;
    const run = ++this.run;
    this.reconnects = 0;
    this.view.messages.hide();
    this.setState("starting");
    try {
      const camera = await openCamera(this.view.cameraChoice());
      if (run !== this.run) return stopStream(camera);
      this.camera = camera;
      attach(this.view.inputVideo, camera);
      this.view.onCameraOpened();
      this.setState("connecting");
      await this.connect(run);
    } catch (error) {
      if (run !== this.run) return;
      await this.teardown();
      this.setState("idle");
      if (!(await this.retryWhenLoaded(error, run))) this.reportStartError(error);
    }
  }

  /** A 503 while the model loads: say so and start again by itself once it may be ready. */
  async retryWhenLoaded(error, run) {
    if (!(error instanceof ApiError) || error.status !== 503) return false;
    let status = null;
    try {
      status = await this.api.health();
    } catch {
      return false;
    }
    if (status !== "LOADING" || run !== this.run) return false;
    this.view.messages.show(
      "The model is still loading. The session starts by itself as soon as it is ready…",
      { kind: "warning", action: { label: "Cancel", handler: () => (this.run += 1) } },
    );
    this.startWhenLoaded(run);
    return true;
  }

  async startWhenLoaded(run) {
    const waiting = () => run === this.run && this.state === "idle";
    while (waiting()) {
      await sleep(LOADING_POLL_MS);
      const status = await this.api.health().catch(() => "unreachable");
      if (status !== "LOADING") break;
    }
    if (waiting()) this.start();
  }

  /** Opens a session for the camera stream; resolves once the server answered. */
  async connect(run) {
    const iceServers = await this.api.iceServers();
    if (run !== this.run) return;
    const session = new PublishSession(this.api, { stream: this.camera, iceServers });
    this.session = session;
    session.addEventListener("track", (event) => attach(this.view.outputVideo, event.detail));
    session.addEventListener("connected", () => this.onConnected(session));
    session.addEventListener("params", (event) => this.view.form?.applyServerParams(event.detail));
    session.addEventListener("params-error", (event) => this.onParamsError(event.detail));
    session.addEventListener("lost", (event) => this.onLost(session, event.detail));
    try {
      await session.open(this.view.initialParams());
    } catch (error) {
      await session.close();
      throw error;
    }
    if (run !== this.run) return session.close();
    setTimeout(() => {
      if (!session.everConnected) {
        session.markGone(
          "the video connection could not be set up; if the server is on another network it may " +
            "need a TURN server (livediff serve --ice-server)",
        );
      }
    }, CONNECT_TIMEOUT_MS);
  }

  onConnected(session) {
    if (session !== this.session) return;
    const wasReconnecting = this.reconnects > 0;
    this.setState("live");
    this.startStats(session);
    clearTimeout(this.stableTimer);
    this.stableTimer = setTimeout(() => (this.reconnects = 0), STABLE_AFTER_MS);
    if (wasReconnecting) this.view.messages.show("Reconnected.", { kind: "success", autoHideMs: 3000 });
  }

  onParamsError({ status, detail }) {
    if (status === 422 && Array.isArray(detail)) {
      const unplaced = this.view.form?.showErrors(detail.map(fieldError)) ?? [];
      if (unplaced.length) this.view.messages.show(`The server refused: ${unplaced.join("; ")}`);
      return;
    }
    this.view.messages.show(`The server refused the change: ${formatDetail(detail)}`);
  }

  reportStartError(error) {
    if (error instanceof ApiError && error.status === 401) {
      this.view.messages.show(error.message, {
        action: { label: "Enter token", handler: () => this.view.openTokenDialog() },
      });
      return;
    }
    if (error instanceof ApiError && error.status === 422) {
      const unplaced = this.view.form?.showErrors(error.fieldErrors) ?? [];
      const where = unplaced.length ? unplaced.join("; ") : "see the highlighted controls";
      this.view.messages.show(`The server refused these settings: ${where}.`);
      return;
    }
    this.view.messages.show(error.message || String(error), {
      action: { label: "Try again", handler: () => this.start() },
    });
  }

  /** The session ended without Stop: reconnect a few times, then give up with the reason. */
  async onLost(session, reason) {
    if (session !== this.session || !["live", "connecting", "reconnecting"].includes(this.state)) {
      return;
    }
    const run = this.run;
    this.view.onOutputLost();
    this.stopStats();
    this.session = null;
    while (this.reconnects < MAX_RECONNECTS) {
      this.reconnects += 1;
      this.setState("reconnecting");
      this.view.messages.show(
        `Connection lost: ${sentence(reason)} Reconnecting (${this.reconnects}/${MAX_RECONNECTS})…`,
        { kind: "warning" },
      );
      await sleep(1000 * 2 ** (this.reconnects - 1));
      if (run !== this.run) return;
      try {
        await this.connect(run);
        return;
      } catch (error) {
        reason = error.message;
        if (error instanceof ApiError && error.status === 401) break;
      }
    }
    await this.teardown();
    this.setState("idle");
    this.view.messages.show(`Connection lost: ${sentence(reason)} Press Start to try again.`, {
      action: { label: "Start again", handler: () => this.start() },
    });
  }

  async stop() {
    if (this.state === "idle" || this.state === "stopping") return;
    this.run += 1;
    this.setState("stopping");
    this.view.messages.hide();
    await this.teardown();
    this.setState("idle");
  }

  /** Releases everything: recording saved, stats stopped, session closed, camera off. */
  async teardown() {
    this.stopStats();
    clearTimeout(this.stableTimer);
    await this.view.onTeardown();
    const session = this.session;
    this.session = null;
    stopStream(this.camera);
    this.camera = null;
    attach(this.view.inputVideo, null);
    attach(this.view.outputVideo, null);
    await session?.close();
  }

  /** Switches camera or resolution while live, without a new session. */
  async switchCamera() {
    if (!this.session || !this.camera) return;
    const camera = await openCamera(this.view.cameraChoice());
    const old = this.camera;
    this.camera = camera;
    await this.session.replaceTrack(camera.getVideoTracks()[0]);
    attach(this.view.inputVideo, camera);
    stopStream(old);
  }

  sendParams(patch) {
    return this.session?.sendParams(patch);
  }

  startStats(session) {
    this.stopStats();
    const sampler = new StatsSampler();
    const serverStats = () =>
      this.api.session(session.id).catch((error) => {
        if (error instanceof ApiError && error.status === 404) {
          session.markGone("the server ended the session");
        }
        return null;
      });
    const tick = async () => {
      if (session !== this.session) return;
      try {
        const [report, server] = await Promise.all([session.pc.getStats(), serverStats()]);
        if (session !== this.session) return;
        renderStats(this.view.statsList, sampler.sample(report, server));
        this.view.onStatsTick();
      } catch (error) {
        // The peer closed between two ticks; the "lost" path reports that.
        if (session === this.session) console.warn("livediff: stats failed:", error);
      }
    };
    tick();
    this.statsTimer = setInterval(tick, STATS_INTERVAL_MS);
  }

  stopStats() {
    clearInterval(this.statsTimer);
    this.statsTimer = null;
  }

  /** Closes the session as the page goes away (the request outlives the page). */
  closeOnUnload() {
    this.session?.close({ keepalive: true });
  }
}
