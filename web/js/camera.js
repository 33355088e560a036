// The camera: which ones there are, opening one at a resolution, and saying why it failed.

export const RESOLUTIONS = [
  { id: "640x480", label: "640 × 480", width: 640, height: 480 },
  { id: "1280x720", label: "1280 × 720 (HD)", width: 1280, height: 720 },
  { id: "960x540", label: "960 × 540", width: 960, height: 540 },
  { id: "512x512", label: "512 × 512 (square)", width: 512, height: 512 },
  { id: "320x240", label: "320 × 240 (light)", width: 320, height: 240 },
];

/** A camera problem, with a message that tells the user what to do about it. */
export class CameraError extends Error {
  constructor(message, cause) {
    super(message);
    this.name = "CameraError";
    this.cause = cause;
  }
}

function mediaDevices() {
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    throw new CameraError(
      "This page cannot use a camera here: browsers allow cameras only on https:// pages or on " +
        "http://localhost. Open the page through https, or on the machine that runs livediff.",
    );
  }
  return navigator.mediaDevices;
}

/** The video inputs as [{deviceId, label}]; labels appear once the camera was allowed. */
export async function listCameras() {
  let devices;
  try {
    devices = await mediaDevices().enumerateDevices();
  } catch {
    return [];
  }
  return devices
    .filter((device) => device.kind === "videoinput")
    .map((device, index) => ({
      deviceId: device.deviceId,
      label: device.label || `Camera ${index + 1}`,
    }));
}

/** A MediaStream with one video track from the chosen camera, near the chosen resolution. */
export async function openCamera({ deviceId = "", resolution = RESOLUTIONS[0] } = {}) {
  const video = {
    width: { ideal: resolution.width },
    height: { ideal: resolution.height },
    frameRate: { ideal: 30, max: 30 },
  };
  if (deviceId) video.deviceId = { exact: deviceId };
  try {
    return await mediaDevices().getUserMedia({ video, audio: false });
  } catch (error) {
    if (error instanceof CameraError) throw error;
    throw new CameraError(cameraErrorMessage(error, resolution), error);
  }
}

/** What to tell the user for a getUserMedia error (its name is standard across browsers). */
export function cameraErrorMessage(error, resolution) {
  switch (error?.name) {
    case "NotAllowedError":
    case "PermissionDeniedError":
      return (
        "Camera access was denied. Allow the camera for this site (the camera icon in the " +
        "address bar, or the browser's site settings), then press Start again."
      );
    case "NotFoundError":
    case "DevicesNotFoundError":
      return "No camera was found. Connect a camera (or pick another one), then press Start again.";
    case "NotReadableError":
    case "TrackStartError":
      return (
        "The camera is busy or failed to start. Close other apps or tabs that use it, " +
        "then press Start again."
      );
    case "OverconstrainedError":
      if (error.constraint === "deviceId") {
        return (
          "The chosen camera is not available any more (unplugged?). " +
          "Pick another camera, then press Start again."
        );
      }
      return (
        `This camera cannot deliver ${resolution?.label ?? "that resolution"}. ` +
        "Choose another camera or resolution."
      );
    case "AbortError":
      return "The camera stopped while starting. Press Start to try again.";
    default:
      return `The camera could not be opened (${error?.name ?? "error"}: ${error?.message ?? error}).`;
  }
}

export function stopStream(stream) {
  for (const track of stream?.getTracks() ?? []) track.stop();
}
