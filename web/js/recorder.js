// Recording the restyled output to a file with MediaRecorder, and the share link for viewers.

const MIME_TYPES = [
  "video/webm;codecs=vp9",
  "video/webm;codecs=vp8",
  "video/webm",
  "video/mp4;codecs=avc1",
  "video/mp4",
];

export function recordingSupported() {
  return typeof MediaRecorder !== "undefined";
}

function chooseMimeType() {
  return MIME_TYPES.find((type) => MediaRecorder.isTypeSupported(type)) ?? "";
}

function timestamp(date = new Date()) {
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}${pad(date.getMonth() + 1)}${pad(date.getDate())}-` +
    `${pad(date.getHours())}${pad(date.getMinutes())}${pad(date.getSeconds())}`
  );
}

/** Records a MediaStream; ``stop()`` resolves to {blob, filename}. */
export class OutputRecorder {
  constructor(stream) {
    const mimeType = chooseMimeType();
    this.recorder = new MediaRecorder(stream, mimeType ? { mimeType } : undefined);
    this.chunks = [];
    this.startedAt = 0;
    this.recorder.addEventListener("dataavailable", (event) => {
      if (event.data.size > 0) this.chunks.push(event.data);
    });
  }

  start() {
    this.startedAt = performance.now();
    this.recorder.start(1000);
  }

  get elapsedS() {
    return this.startedAt ? (performance.now() - this.startedAt) / 1000 : 0;
  }

  get recording() {
    return this.recorder.state === "recording";
  }

  stop() {
    return new Promise((resolve, reject) => {
      if (this.recorder.state === "inactive") {
        reject(new Error("the recorder is not running"));
        return;
      }
      this.recorder.addEventListener(
        "stop",
        () => {
          const type = this.recorder.mimeType || "video/webm";
          const extension = type.startsWith("video/mp4") ? "mp4" : "webm";
          const blob = new Blob(this.chunks, { type: type.split(";")[0] });
          resolve({ blob, filename: `livediff-${timestamp()}.${extension}` });
        },
        { once: true },
      );
      this.recorder.stop();
    });
  }
}

/** Offers a blob as a download (a temporary link, clicked). */
export function download(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** The address of the WHEP viewer page for a session (the token is never put in it). */
export function shareUrl(sessionId) {
  const url = new URL("watch.html", location.href);
  url.search = new URLSearchParams({ session: sessionId }).toString();
  return url.href;
}

/** Copies text to the clipboard where the browser allows it; false otherwise. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}

export function formatDuration(seconds) {
  const whole = Math.floor(seconds);
  return `${String(Math.floor(whole / 60)).padStart(2, "0")}:${String(whole % 60).padStart(2, "0")}`;
}
