// A WHEP viewer on werift, a WebRTC stack written in TypeScript.
//
//   node whep-watch.mjs --url http://127.0.0.1:PORT/whep/SESSION --codec vp8|h264 \
//       --output received.ivf [--frames 60] [--timeout 30] [--token T]
//
// It offers one receive-only video m-line in that codec, POSTs it once every host candidate
// is in it and applies the answer. It depacketizes the RTP it receives itself (werift does the
// SRTP, RTCP and NACKs) into whole frames: a frame is kept when every packet from its first to
// its marker arrived, starting at a key frame and, after a frame is lost, from the next key
// frame (asked for with a PLI). When --frames frames are in, it writes them to --output (IVF),
// DELETEs its WHEP resource, closes the peer and exits 0; at --timeout it writes what it has
// and exits 3.
//
// stdout, one JSON object a line: answer, connected, first-frame, done.

import { parseArgs } from "node:util";
import {
  deleteResource,
  fail,
  h264AccessUnit,
  h264IsKey,
  makePeer,
  negotiate,
  report,
  vp8Info,
  vp8Unpack,
  waitConnected,
  writeFrames,
} from "./werift-common.mjs";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    codec: { type: "string", default: "vp8" },
    output: { type: "string" },
    frames: { type: "string", default: "60" },
    timeout: { type: "string", default: "30" },
    token: { type: "string" },
  },
});
if (!args.url || !args.output || !["vp8", "h264"].includes(args.codec)) {
  fail(64, "usage: whep-watch.mjs --url URL --codec vp8|h264 --output FILE.ivf");
}
const wanted = Number(args.frames);

/** 32-bit RTP timestamps and 16-bit sequence numbers compare modulo their range. */
const newer = (a, b) => ((a - b) | 0) > 0;
const seqAdd = (seq, n) => (seq + n) & 0xffff;

class FrameAssembler {
  constructor(codec, onFrame, askForKeyFrame) {
    this.codec = codec;
    this.onFrame = onFrame;
    this.askForKeyFrame = askForKeyFrame;
    this.pending = new Map(); // RTP timestamp -> { packets: Map(seq -> payload), start, marker }
    this.markers = []; // sequence numbers of recent marker packets: the next frame starts after
    this.last = null; // timestamp of the last frame taken or given up
    this.needKey = true;
    this.stats = { packets: 0, late: 0, lost: 0, skipped: 0, broken: 0 };
  }

  push(rtp) {
    const { header, payload } = rtp;
    if (payload.length === 0) return;
    this.stats.packets += 1;
    const { timestamp, sequenceNumber: seq } = header;
    if (this.last !== null && !newer(timestamp, this.last)) {
      this.stats.late += 1;
      return;
    }
    let frame = this.pending.get(timestamp);
    if (!frame) {
      frame = { packets: new Map(), start: null, marker: null };
      this.pending.set(timestamp, frame);
    }
    frame.packets.set(seq, payload);
    if (this.codec === "vp8" && vp8Unpack(payload).start) frame.start = seq;
    if (header.marker) {
      frame.marker = seq;
      this.markers = [...this.markers.slice(-63), seq];
    }
    this.takeComplete();
  }

  startOf(frame) {
    if (frame.start !== null) return frame.start;
    for (const seq of frame.packets.keys()) {
      if (this.markers.includes(seqAdd(seq, -1))) return seq;
    }
    return null;
  }

  payloadsOf(frame) {
    const start = this.startOf(frame);
    if (start === null || frame.marker === null) return null;
    const payloads = [];
    for (let seq = start; ; seq = seqAdd(seq, 1)) {
      const payload = frame.packets.get(seq);
      if (!payload) return null;
      payloads.push(payload);
      if (seq === frame.marker) return payloads;
    }
  }

  takeComplete() {
    const timestamps = [...this.pending.keys()].sort((a, b) => (newer(a, b) ? 1 : -1));
    for (const timestamp of timestamps) {
      const payloads = this.payloadsOf(this.pending.get(timestamp));
      if (!payloads) continue;
      for (const older of timestamps) {
        if (older === timestamp) break;
        this.pending.delete(older); // overtaken by a later whole frame: lost
        this.stats.lost += 1;
        this.needKey = true;
      }
      this.pending.delete(timestamp);
      this.last = timestamp;
      this.take(payloads);
      this.takeComplete();
      return;
    }
  }

  take(payloads) {
    const data =
      this.codec === "vp8"
        ? Buffer.concat(payloads.map((payload) => vp8Unpack(payload).data))
        : h264AccessUnit(payloads);
    if (!data) {
      this.stats.broken += 1;
      this.needKey = true;
      this.askForKeyFrame();
      return;
    }
    const key = this.codec === "vp8" ? vp8Info(data).key : h264IsKey(data);
    if (this.needKey && !key) {
      this.stats.skipped += 1;
      this.askForKeyFrame();
      return;
    }
    this.needKey = false;
    this.onFrame(data, key);
  }
}

const pc = makePeer(args.codec);
const transceiver = pc.addTransceiver("video", { direction: "recvonly" });
const frames = [];
const counts = { keyframes: 0, width: 0, height: 0, pictureLoss: 0 };
let remoteSsrc = null;
let lastAsked = 0;
let connectedAt = null;
let finish;
const finished = new Promise((resolve) => {
  finish = resolve;
});

const assembler = new FrameAssembler(
  args.codec,
  (data, key) => {
    if (frames.length >= wanted) return; // done: the rest is not kept
    if (frames.length === 0) {
      report("first-frame", { ms: Math.round(performance.now() - (connectedAt ?? 0)), key });
    }
    frames.push(data);
    if (key) {
      counts.keyframes += 1;
      if (args.codec === "vp8" && counts.width === 0) {
        const { width, height } = vp8Info(data);
        Object.assign(counts, { width, height });
      }
    }
    if (frames.length >= wanted) finish(0);
  },
  () => {
    const now = performance.now();
    if (remoteSsrc === null || now - lastAsked < 300) return;
    lastAsked = now;
    counts.pictureLoss += 1;
    transceiver.receiver.sendRtcpPLI(remoteSsrc).catch(() => {
      counts.pictureLoss -= 1; // not sent (the transport is closing): not counted
    });
  },
);
pc.onTrack.subscribe((track) => {
  track.onReceiveRtp.subscribe((rtp) => {
    remoteSsrc = rtp.header.ssrc;
    assembler.push(rtp);
  });
});

const answer = await negotiate(pc, args.url, args.token);
try {
  await waitConnected(pc);
} catch (error) {
  fail(3, `the WHEP peer connection did not connect: ${error.message}`);
}
connectedAt = performance.now();
report("connected");
const timer = setTimeout(() => finish(3), Number(args.timeout) * 1000);
const code = await finished;
clearTimeout(timer);

writeFrames(args.output, args.codec, counts.width, counts.height, frames);
const deleted = answer.location ? await deleteResource(answer.location, args.token) : null;
report("done", {
  frames: frames.length,
  ...counts,
  ...assembler.stats,
  timeout: code !== 0,
  deleteStatus: deleted,
  seconds: (performance.now() - connectedAt) / 1000,
});
await pc.close();
process.exit(code);
