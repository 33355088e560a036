// A WHEP viewer (RFC draft-ietf-wish-whep): watch a running session's restyled output.

import { waitForIceGathering } from "./rtc.js";

/** Events: "track" (detail: MediaStream), "connected", "lost" (detail: reason). */
export class WhepViewer extends EventTarget {
  constructor(api, sessionId, { iceServers = [] } = {}) {
    super();
    this.api = api;
    this.sessionId = sessionId;
    this.pc = new RTCPeerConnection({ iceServers });
    this.location = null;
    this.closed = false;
  }

  async open() {
    this.pc.addTransceiver("video", { direction: "recvonly" });
    this.pc.addTransceiver("audio", { direction: "recvonly" });
    this.pc.addEventListener("track", (event) => {
      if (event.track.kind !== "video") return;
      const stream = event.streams[0] ?? new MediaStream([event.track]);
      this.dispatchEvent(new CustomEvent("track", { detail: stream }));
    });
    this.pc.addEventListener("connectionstatechange", () => {
      const state = this.pc.connectionState;
      if (state === "connected") this.dispatchEvent(new Event("connected"));
      if (state === "failed" || state === "closed") this._lose(`the connection ${state}`);
    });
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await waitForIceGathering(this.pc);
    const answer = await this.api.watch(this.sessionId, this.pc.localDescription.sdp);
    this.location = answer.location;
    await this.pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  }

  _lose(reason) {
    if (this.closed) return;
    this.closed = true;
    this.pc.close();
    this.dispatchEvent(new CustomEvent("lost", { detail: reason }));
  }

  async close() {
    if (this.closed) return;
    this.closed = true;
    this.pc.close();
    if (this.location) {
      try {
        await this.api.leave(this.location);
      } catch (error) {
        console.warn("livediff: leaving the WHEP session failed:", error);
      }
    }
  }
}
