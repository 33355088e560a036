// A WHIP publisher (RFC 9725) on werift, a WebRTC stack written in TypeScript.
//
//   node whip-publish.mjs --url http://127.0.0.1:PORT/whip --input frames.ivf [--token T]
//
// It offers one send-only video m-line in the codec of the IVF file (VP8 or H.264), POSTs the
// offer once every host candidate is in it, applies the answer and, once connected, sends the
// file's frames at --fps, over and over (the file starts with a key frame), as RTP that it
// packetizes itself; werift does the SRTP, RTCP and NACK retransmissions. When its stdin
// closes it stops sending, DELETEs the WHIP resource, closes the peer and exits 0.
//
// stdout, one JSON object a line: answer, connected, done.

import { parseArgs } from "node:util";
import { MediaStreamTrack, RtpHeader, RtpPacket } from "werift";
import {
  deleteResource,
  fail,
  h264IsKey,
  h264Payloads,
  makePeer,
  negotiate,
  readFrames,
  report,
  vp8Info,
  vp8Payloads,
  waitConnected,
} from "./werift-common.mjs";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    input: { type: "string" },
    token: { type: "string" },
    fps: { type: "string", default: "30" },
    timeout: { type: "string", default: "120" },
  },
});
if (!args.url || !args.input) fail(64, "usage: whip-publish.mjs --url URL --input FILE.ivf");
const fps = Number(args.fps);
const deadline = Number(args.timeout) * 1000;
setTimeout(() => fail(4, `still running after ${args.timeout} s`), deadline).unref();

let stdinEnded = false;
const stdinEnd = new Promise((resolve) => {
  const ended = () => {
    stdinEnded = true;
    resolve();
  };
  process.stdin.once("end", ended);
  process.stdin.once("close", ended);
});
process.stdin.resume();

const source = readFrames(args.input);
const pc = makePeer(source.codec);
const track = new MediaStreamTrack({ kind: "video" });
const transceiver = pc.addTransceiver(track, { direction: "sendonly" });
let pictureLoss = 0;
transceiver.sender.onPictureLossIndication.subscribe(() => {
  pictureLoss += 1;
});

const answer = await negotiate(pc, args.url, args.token);
try {
  await waitConnected(pc);
} catch (error) {
  fail(3, `the WHIP peer connection did not connect: ${error.message}`);
}
report("connected", { codec: source.codec, frames: source.frames.length });

const packetize = source.codec === "h264" ? h264Payloads : vp8Payloads;
const isKey = source.codec === "h264" ? h264IsKey : (frame) => vp8Info(frame).key;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let sequenceNumber = Math.floor(Math.random() * 0x10000);
const counts = { frames: 0, keyframes: 0, packets: 0, bytes: 0 };
const start = performance.now();
for (let index = 0; ; index++) {
  const wait = start + (index * 1000) / fps - performance.now();
  if (wait > 0) await sleep(wait);
  if (stdinEnded || pc.connectionState !== "connected") break;
  const frame = source.frames[index % source.frames.length];
  const payloads = packetize(frame);
  const timestamp = Math.round((index * 90_000) / fps) >>> 0;
  payloads.forEach((payload, i) => {
    const marker = i === payloads.length - 1; // the last packet of a frame (RFC 7741, 6184)
    const header = new RtpHeader({ payloadType: 0, sequenceNumber, timestamp, marker });
    track.writeRtp(new RtpPacket(header, payload)); // the sender sets SSRC and payload type
    sequenceNumber = (sequenceNumber + 1) & 0xffff;
  });
  counts.frames += 1;
  counts.keyframes += isKey(frame) ? 1 : 0;
  counts.packets += payloads.length;
  counts.bytes += frame.length;
}
const seconds = (performance.now() - start) / 1000;
const connection = pc.connectionState; // before the DELETE: whether sending ended connected

await stdinEnd;
const deleted = answer.location ? await deleteResource(answer.location, args.token) : null;
report("done", { ...counts, seconds, pictureLoss, deleteStatus: deleted, connection });
await pc.close();
process.exit(0);
