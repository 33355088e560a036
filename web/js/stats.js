// Live numbers for the overlay: the browser's RTCPeerConnection.getStats() plus the server's
// session stats, sampled once a second. Standard stats fields only (Chromium and Firefox).

/** The standard stats this overlay reads, by type, from one getStats() report. */
function pick(report) {
  const found = { inbound: null, outbound: null, pair: null, remoteInbound: null, transport: null };
  const pairs = new Map();
  for (const stat of report.values()) {
    if (stat.type === "inbound-rtp" && stat.kind === "video") found.inbound = stat;
    else if (stat.type === "outbound-rtp" && stat.kind === "video") found.outbound = stat;
    else if (stat.type === "remote-inbound-rtp" && stat.kind === "video") found.remoteInbound = stat;
    else if (stat.type === "transport") found.transport = stat;
    else if (stat.type === "candidate-pair") pairs.set(stat.id, stat);
  }
  const selectedId = found.transport?.selectedCandidatePairId;
  found.pair =
    pairs.get(selectedId) ??
    [...pairs.values()].find((pair) => pair.selected || (pair.nominated && pair.state === "succeeded")) ??
    null;
  return found;
}

function perSecond(now, before, field, seconds) {
  if (!now || !before || seconds <= 0) return null;
  const delta = (now[field] ?? 0) - (before[field] ?? 0);
  return delta >= 0 ? delta / seconds : null;
}

/** Milliseconds of ``total`` (seconds) per unit of ``count`` over the last interval. */
function perUnitMs(now, before, total, count) {
  if (!now || now[total] === undefined || now[count] === undefined) return null;
  const units = now[count] - (before?.[count] ?? 0);
  if (units <= 0) return null;
  return ((now[total] - (before?.[total] ?? 0)) / units) * 1000;
}

function sum(values) {
  const known = values.filter((value) => value !== null && value !== undefined);
  return known.length ? known.reduce((a, b) => a + b, 0) : null;
}

/** Turns successive getStats() reports into rates; feed it once a second. */
export class StatsSampler {
  constructor() {
    this.previous = null;
    this.previousAt = 0;
  }

  /** A snapshot of numbers (null where unknown) from a stats report and the server's stats. */
  sample(report, server) {
    const now = pick(report);
    const at = performance.now();
    const seconds = this.previous ? (at - this.previousAt) / 1000 : 0;
    const before = this.previous ?? {};
    this.previous = now;
    this.previousAt = at;

    const fpsOut = now.inbound?.framesPerSecond ?? perSecond(now.inbound, before.inbound, "framesDecoded", seconds);
    const fpsIn = now.outbound?.framesPerSecond ?? perSecond(now.outbound, before.outbound, "framesEncoded", seconds);
    const rttS = now.pair?.currentRoundTripTime ?? now.remoteInbound?.roundTripTime ?? null;
    const rttMs = rttS === null ? null : rttS * 1000;
    const bytesIn = perSecond(now.inbound, before.inbound, "bytesReceived", seconds);
    const bytesOut = perSecond(now.outbound, before.outbound, "bytesSent", seconds);
    const encodeMs = perUnitMs(now.outbound, before.outbound, "totalEncodeTime", "framesEncoded");
    const decodeMs = perUnitMs(now.inbound, before.inbound, "totalDecodeTime", "framesDecoded");
    const jitterMs = perUnitMs(now.inbound, before.inbound, "jitterBufferDelay", "jitterBufferEmittedCount");
    const serverMs = server?.latency_ms?.p50 ?? null;
    const parts = [encodeMs, rttMs, serverMs, jitterMs, decodeMs];
    return {
      fpsOut,
      fpsIn,
      rttMs,
      bitrateIn: bytesIn === null ? null : bytesIn * 8,
      bitrateOut: bytesOut === null ? null : bytesOut * 8,
      // Camera frame to screen: encode, the network both ways, the server (ingest to send),
      // the receive jitter buffer and decode. Parts not yet known count as zero.
      latencyMs: serverMs === null && rttMs === null ? null : sum(parts),
      latencyParts: { encodeMs, rttMs, serverMs, jitterMs, decodeMs },
      droppedServer: server?.frames_dropped ?? null,
      droppedBrowser: now.inbound?.framesDropped ?? null,
      dropped: sum([server?.frames_dropped ?? null, now.inbound?.framesDropped ?? null]),
      serverFpsIn: server?.fps_in ?? null,
      serverFpsOut: server?.fps_out ?? null,
      outputSize: now.inbound?.frameWidth ? `${now.inbound.frameWidth}×${now.inbound.frameHeight}` : null,
    };
  }
}

function fixed(value, digits) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : value.toFixed(digits);
}

export function formatBitrate(bitsPerSecond) {
  if (bitsPerSecond === null || bitsPerSecond === undefined) return "–";
  if (bitsPerSecond >= 1e6) return `${(bitsPerSecond / 1e6).toFixed(2)} Mb/s`;
  return `${Math.round(bitsPerSecond / 1e3)} kb/s`;
}

/** The overlay's lines: [key, label, value, title]. */
export function statsLines(snapshot) {
  const parts = snapshot.latencyParts;
  const latencyTitle =
    `encode ${fixed(parts.encodeMs, 1)} ms + network round trip ${fixed(parts.rttMs, 1)} ms + ` +
    `server ${fixed(parts.serverMs, 1)} ms + jitter buffer ${fixed(parts.jitterMs, 1)} ms + ` +
    `decode ${fixed(parts.decodeMs, 1)} ms`;
  return [
    ["fps_out", "Output", `${fixed(snapshot.fpsOut, 1)} fps`, `server sends ${fixed(snapshot.serverFpsOut, 1)} fps`],
    ["fps_in", "Input", `${fixed(snapshot.fpsIn, 1)} fps`, `server receives ${fixed(snapshot.serverFpsIn, 1)} fps`],
    ["latency", "Latency ≈", `${fixed(snapshot.latencyMs, 0)} ms`, latencyTitle],
    ["rtt", "Round trip", `${fixed(snapshot.rttMs, 1)} ms`, "ICE candidate pair round-trip time"],
    [
      "bitrate",
      "Bitrate",
      `↓ ${formatBitrate(snapshot.bitrateIn)} ↑ ${formatBitrate(snapshot.bitrateOut)}`,
      "↓ restyled video received, ↑ camera sent",
    ],
    [
      "dropped",
      "Dropped",
      snapshot.dropped === null ? "–" : String(snapshot.dropped),
      `server ${snapshot.droppedServer ?? "–"} (newest frame wins), decoder ${snapshot.droppedBrowser ?? "–"}`,
    ],
  ];
}

/** Writes the snapshot into the overlay element (a <dl> with one row per line). */
export function renderStats(list, snapshot) {
  for (const [key, label, value, title] of statsLines(snapshot)) {
    let row = list.querySelector(`[data-stat="${key}"]`);
    if (!row) {
      row = document.createElement("div");
      row.dataset.stat = key;
      row.append(document.createElement("dt"), document.createElement("dd"));
      list.append(row);
    }
    row.title = title;
    row.children[0].textContent = label;
    row.children[1].textContent = value;
  }
}
