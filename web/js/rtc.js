// A livediff session from the browser: the camera goes up, the restyled video comes back on the
// same peer, and params travel over the "params" data channel (HTTP PATCH until it opens).

import { ApiError } from "./api.js";

const GATHER_TIMEOUT_MS = 3000;
const DISCONNECTED_GRACE_MS = 4000;
export const PARAMS_CHANNEL = "params";

/** Resolves once ICE gathering is complete, or after timeoutMs with what was gathered by then. */
export function waitForIceGathering(pc, timeoutMs = GATHER_TIMEOUT_MS) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(finish, timeoutMs);
    function finish() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check() {
      if (pc.iceGatheringState === "complete") finish();
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/**
 * One publishing session. Events: "track" (detail: MediaStream of the output),
 * "connected", "params" (detail: the params the server applied),
 * "params-error" (detail: {status, detail}), "lost" (detail: reason; when the server ended the
 * session it says why on the params channel first: {"type": "ended", "reason": ...}).
 */
export class PublishSession extends EventTarget {
  constructor(api, { stream, iceServers = [] }) {
    super();
    this.api = api;
    this.stream = stream;
    this.pc = new RTCPeerConnection({ iceServers });
    this.channel = null;
    this.sender = null;
    this.id = null;
    this.closed = false;
    this.everConnected = false;
    this._graceTimer = null;
  }

  /** Negotiates the session with ``params`` as its initial params; throws ApiError if refused. */
  async open(params) {
    const [track] = this.stream.getVideoTracks();
    this.sender = this.pc.addTransceiver(track, {
      direction: "sendrecv",
      streams: [this.stream],
    }).sender;
    this._openChannel();
    this.pc.addEventListener("track", (event) => this._onTrack(event));
    this.pc.addEventListener("connectionstatechange", () => this._onConnectionState());
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await waitForIceGathering(this.pc);
    const answer = await this.api.openSession(this.pc.localDescription.sdp, params);
    this.id = answer.session_id;
    if (this.closed) {
      await this._deleteOnServer(false);
      throw new Error("the session was stopped while it opened");
    }
    await this.pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    return this.id;
  }

  _openChannel() {
    this.channel = this.pc.createDataChannel(PARAMS_CHANNEL, { ordered: true });
    this.channel.addEventListener("message", (event) => this._onMessage(event.data));
    this.channel.addEventListener("close", () => {
      if (this.everConnected) this._lose("the server closed the session");
    });
  }

  _onTrack(event) {
    if (event.track.kind !== "video") return;
    const output = event.streams[0] ?? new MediaStream([event.track]);
    this.dispatchEvent(new CustomEvent("track", { detail: output }));
  }

  _onConnectionState() {
    const state = this.pc.connectionState;
    clearTimeout(this._graceTimer);
    if (state === "connected") {
      this.everConnected = true;
      this.dispatchEvent(new Event("connected"));
    } else if (state === "failed" || state === "closed") {
      this._lose(`the connection ${state}`);
    } else if (state === "disconnected") {
      this._graceTimer = setTimeout(
        () => this._lose("the connection was interrupted"),
        DISCONNECTED_GRACE_MS,
      );
    }
  }

  _onMessage(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message.type === "params") {
      this.dispatchEvent(new CustomEvent("params", { detail: message.params }));
    } else if (message.type === "error") {
      this.dispatchEvent(
        new CustomEvent("params-error", {
          detail: { status: message.status, detail: message.detail },
        }),
      );
    } else if (message.type === "ended") {
      this._lose(`the server ended the session: ${message.reason}`);
    }
  }

  /** Reports the session gone (once); the owner decides whether to reconnect. */
  _lose(reason) {
    if (this.closed) return;
    this.closed = true;
    this.dispatchEvent(new CustomEvent("lost", { detail: reason }));
    this._teardown();
  }

  /** Called by the owner when the session endpoint says the session no longer exists. */
  markGone(reason) {
    this._lose(reason);
  }

  /** Sends a params patch: over the data channel when open, else with HTTP PATCH. */
  async sendParams(patch) {
    if (this.closed || this.id === null) return;
    if (this.channel?.readyState === "open") {
      this.channel.send(JSON.stringify(patch));
      return;
    }
    try {
      const params = await this.api.patchParams(this.id, patch);
      this.dispatchEvent(new CustomEvent("params", { detail: params }));
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      this.dispatchEvent(
        new CustomEvent("params-error", { detail: { status: error.status, detail: error.detail } }),
      );
    }
  }

  /** Switches the camera without renegotiating. */
  async replaceTrack(track) {
    await this.sender?.replaceTrack(track);
  }

  /** Ends the session on the server and locally; ``keepalive`` lets it finish as the page unloads. */
  async close({ keepalive = false } = {}) {
    const wasOpen = !this.closed;
    this.closed = true;
    this._teardown();
    if (wasOpen) await this._deleteOnServer(keepalive);
  }

  async _deleteOnServer(keepalive) {
    if (this.id === null) return;
    try {
      await this.api.closeSession(this.id, { keepalive });
    } catch (error) {
      // 404: the server had already ended it. Anything else is reported but changes nothing here.
      if (!(error instanceof ApiError) || error.status !== 404) {
        console.warn("livediff: closing the session failed:", error);
      }
    }
  }

  _teardown() {
    clearTimeout(this._graceTimer);
    this.channel?.close();
    this.pc.close();
  }
}
