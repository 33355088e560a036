// Shared parts of the werift WHIP publisher and WHEP viewer (tests/interop/test_werift.py):
// the peer, HTTP signalling, the frame file both scripts use, and the RTP payload formats of
// VP8 (RFC 7741) and H.264 (RFC 6184, packetization-mode 1).
//
// Each script reports on stdout, one JSON object a line ({"event": ...}); the test reads them.

import { readFileSync, writeFileSync } from "node:fs";
import { RTCPeerConnection, useH264, useVP8 } from "werift";

/** Largest RTP payload we make: well under any loopback or Ethernet MTU with SRTP added. */
export const MAX_PAYLOAD = 1100;

export function report(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

/** Print the reason and exit with `code` (the test shows the reason when it fails). */
export function fail(code, reason, fields = {}) {
  report("error", { reason, ...fields });
  process.exit(code);
}

export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------- peer and signalling

/** A werift peer that offers one codec and gathers host candidates only (no STUN: the
 * server is on this machine, and werift's default STUN server is on the internet). */
export function makePeer(codec) {
  const video = codec === "h264" ? useH264() : useVP8();
  return new RTCPeerConnection({
    codecs: { audio: [], video: [video] },
    iceServers: [],
    iceUseIpv6: false,
  });
}

/** Create the offer and wait until every candidate is in it (WHIP/WHEP without trickle). */
export async function completeOffer(pc, timeoutMs = 10_000) {
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== "complete") {
    await withTimeout(
      new Promise((resolve) => {
        const { unSubscribe } = pc.iceGatheringStateChange.subscribe((state) => {
          if (state === "complete") {
            unSubscribe();
            resolve();
          }
        });
      }),
      timeoutMs,
      "ICE gathering",
    );
  }
  return pc.localDescription.sdp;
}

export function waitConnected(pc, timeoutMs = 15_000) {
  if (pc.connectionState === "connected") return Promise.resolve();
  return withTimeout(
    new Promise((resolve, reject) => {
      pc.connectionStateChange.subscribe((state) => {
        if (state === "connected") resolve();
        if (state === "failed" || state === "closed") reject(new Error(`connection ${state}`));
      });
    }),
    timeoutMs,
    "connecting",
  );
}

function authorization(token) {
  return token ? { authorization: `Bearer ${token}` } : {};
}

/** POST the offer (RFC 9725 section 4.2); the Location is made absolute. */
export async function postOffer(url, sdp, token) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/sdp", ...authorization(token) },
    body: sdp,
  });
  const body = await response.text();
  const location = response.headers.get("location");
  return {
    status: response.status,
    contentType: response.headers.get("content-type"),
    body,
    location: location ? new URL(location, url).href : null,
  };
}

export async function deleteResource(url, token) {
  const response = await fetch(url, { method: "DELETE", headers: authorization(token) });
  await response.arrayBuffer();
  return response.status;
}

/** Offer, POST, apply the answer: the signalling half of a WHIP or WHEP client. */
export async function negotiate(pc, url, token) {
  const offer = await completeOffer(pc);
  const answer = await postOffer(url, offer, token);
  if (answer.status !== 201) {
    fail(2, `POST ${url} answered ${answer.status}`, { status: answer.status, body: answer.body });
  }
  await pc.setRemoteDescription({ type: "answer", sdp: answer.body });
  const codecs = [...answer.body.matchAll(/^a=rtpmap:\d+ ([\w-]+)\/90000/gm)].map((m) => m[1]);
  const { status, contentType, location } = answer;
  report("answer", { status, contentType, location, codecs });
  return answer;
}

// ---------------------------------------------------------------- frame files

// The frame file is IVF: a 32-byte header ("DKIF", version 0, header size 32, a codec
// FourCC, width, height, rate, scale, frame count) and then, per frame, its size (32 bits),
// its pts (64 bits) and its bytes. For H.264 a frame is one access unit in Annex B.
const FOURCC = { vp8: "VP80", h264: "H264" };

export function readFrames(path) {
  const data = readFileSync(path);
  if (data.toString("latin1", 0, 4) !== "DKIF") throw new Error(`${path} is not an IVF file`);
  const fourcc = data.toString("latin1", 8, 12);
  const codec = Object.keys(FOURCC).find((name) => FOURCC[name] === fourcc);
  if (!codec) throw new Error(`${path}: unknown FourCC ${fourcc}`);
  const frames = [];
  let offset = data.readUInt16LE(6);
  while (offset + 12 <= data.length) {
    const size = data.readUInt32LE(offset);
    frames.push(data.subarray(offset + 12, offset + 12 + size));
    offset += 12 + size;
  }
  return { codec, width: data.readUInt16LE(12), height: data.readUInt16LE(14), frames };
}

export function writeFrames(path, codec, width, height, frames) {
  const header = Buffer.alloc(32);
  header.write("DKIF", 0, "latin1");
  header.writeUInt16LE(0, 4);
  header.writeUInt16LE(32, 6);
  header.write(FOURCC[codec], 8, "latin1");
  header.writeUInt16LE(width, 12);
  header.writeUInt16LE(height, 14);
  header.writeUInt32LE(30, 16);
  header.writeUInt32LE(1, 20);
  header.writeUInt32LE(frames.length, 24);
  const parts = [header];
  frames.forEach((frame, index) => {
    const head = Buffer.alloc(12);
    head.writeUInt32LE(frame.length, 0);
    head.writeBigUInt64LE(BigInt(index), 4);
    parts.push(head, frame);
  });
  writeFileSync(path, Buffer.concat(parts));
}

// ---------------------------------------------------------------- VP8 (RFC 7741)

/** Payloads of one VP8 frame: a one-byte descriptor (S set on the first, partition 0). */
export function vp8Payloads(frame, max = MAX_PAYLOAD) {
  const payloads = [];
  for (let offset = 0; offset < frame.length; offset += max - 1) {
    const descriptor = Buffer.from([offset === 0 ? 0x10 : 0x00]);
    payloads.push(Buffer.concat([descriptor, frame.subarray(offset, offset + max - 1)]));
  }
  return payloads;
}

/** Split a VP8 payload into its descriptor's start flag and the frame bytes it carries. */
export function vp8Unpack(payload) {
  let offset = 1;
  const first = payload[0];
  if (first & 0x80) {
    const extension = payload[1];
    offset = 2;
    if (extension & 0x80) offset += payload[offset] & 0x80 ? 2 : 1; // PictureID, 7 or 15 bits
    if (extension & 0x40) offset += 1; // TL0PICIDX
    if (extension & 0x30) offset += 1; // TID/Y/KEYIDX
  }
  const start = (first & 0x10) !== 0 && (first & 0x07) === 0;
  return { start, data: payload.subarray(offset) };
}

/** Whether a VP8 frame is a key frame, and its size (from the key frame header). */
export function vp8Info(frame) {
  const key = frame.length >= 10 && (frame[0] & 0x01) === 0;
  if (!key || frame[3] !== 0x9d || frame[4] !== 0x01 || frame[5] !== 0x2a) return { key: false };
  const width = frame.readUInt16LE(6) & 0x3fff; // the top two bits are the scaling
  const height = frame.readUInt16LE(8) & 0x3fff;
  return { key: true, width, height };
}

// ---------------------------------------------------------------- H.264 (RFC 6184)

const START_CODE = Buffer.from([0, 0, 0, 1]);

/** The NAL units of an Annex B access unit (start codes of 3 or 4 bytes). */
export function nalUnits(accessUnit) {
  const starts = [];
  for (let i = 0; i + 2 < accessUnit.length; i++) {
    if (accessUnit[i] === 0 && accessUnit[i + 1] === 0 && accessUnit[i + 2] === 1) {
      starts.push(i + 3);
      i += 2;
    }
  }
  return starts.map((start, index) => {
    let end = index + 1 < starts.length ? starts[index + 1] - 3 : accessUnit.length;
    while (end > start && accessUnit[end - 1] === 0) end -= 1; // zero_byte, trailing zeros
    return accessUnit.subarray(start, end);
  });
}

/** Payloads of one access unit: single NAL unit packets, FU-A for NAL units over `max`. */
export function h264Payloads(accessUnit, max = MAX_PAYLOAD) {
  const payloads = [];
  for (const nal of nalUnits(accessUnit)) {
    if (nal.length <= max) {
      payloads.push(nal);
      continue;
    }
    const indicator = (nal[0] & 0xe0) | 28;
    const type = nal[0] & 0x1f;
    for (let offset = 1; offset < nal.length; offset += max - 2) {
      const end = offset + max - 2 >= nal.length;
      const header = (offset === 1 ? 0x80 : 0) | (end ? 0x40 : 0) | type;
      const fragment = nal.subarray(offset, offset + max - 2);
      payloads.push(Buffer.concat([Buffer.from([indicator, header]), fragment]));
    }
  }
  return payloads;
}

/** One access unit in Annex B from the payloads of its packets, in order; null when a
 * fragmented NAL unit is cut short or a payload type is one this viewer does not take. */
export function h264AccessUnit(payloads) {
  const nals = [];
  let fragments = null;
  for (const payload of payloads) {
    const type = payload[0] & 0x1f;
    if (type >= 1 && type <= 23) {
      nals.push(payload);
    } else if (type === 24) {
      for (let offset = 1; offset + 2 <= payload.length; ) {
        const size = payload.readUInt16BE(offset);
        nals.push(payload.subarray(offset + 2, offset + 2 + size));
        offset += 2 + size;
      }
    } else if (type === 28) {
      const start = (payload[1] & 0x80) !== 0;
      const end = (payload[1] & 0x40) !== 0;
      if (start) fragments = [Buffer.from([(payload[0] & 0xe0) | (payload[1] & 0x1f)])];
      if (!fragments) return null;
      fragments.push(payload.subarray(2));
      if (end) {
        nals.push(Buffer.concat(fragments));
        fragments = null;
      }
    } else {
      return null;
    }
  }
  if (fragments) return null;
  return Buffer.concat(nals.flatMap((nal) => [START_CODE, nal]));
}

export function h264IsKey(accessUnit) {
  return nalUnits(accessUnit).some((nal) => (nal[0] & 0x1f) === 5);
}
