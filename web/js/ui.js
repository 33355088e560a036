// Small pieces of page chrome shared by the studio and the viewer: messages, status, fullscreen.

export const $ = (selector, root = document) => root.querySelector(selector);

/** The message bar: one message at a time, with an optional action button. */
export class MessageBar {
  constructor(root) {
    this.root = root;
    this.text = $(".message-text", root);
    this.action = $(".message-action", root);
    this.timer = null;
    this.onAction = null;
    $(".message-close", root).addEventListener("click", () => this.hide());
    this.action.addEventListener("click", () => {
      const handler = this.onAction;
      this.hide();
      handler?.();
    });
  }

  /** kind: "error" | "warning" | "info" | "success"; autoHideMs: 0 keeps it until dismissed. */
  show(text, { kind = "error", action = null, autoHideMs = 0 } = {}) {
    clearTimeout(this.timer);
    this.root.dataset.kind = kind;
    this.root.setAttribute("role", kind === "error" || kind === "warning" ? "alert" : "status");
    this.text.textContent = text;
    this.onAction = action?.handler ?? null;
    this.action.hidden = !action;
    this.action.textContent = action?.label ?? "";
    this.root.hidden = false;
    if (autoHideMs) this.timer = setTimeout(() => this.hide(), autoHideMs);
  }

  hide() {
    clearTimeout(this.timer);
    this.root.hidden = true;
    this.onAction = null;
  }
}

const STATUS_LABELS = {
  OK: "Ready · streaming",
  IDLE: "Ready",
  LOADING: "Loading the model…",
  ERROR: "Server error",
  unreachable: "Server unreachable",
  unknown: "Connecting…",
};

/** The server-status pill in the top bar. */
export function showServerStatus(root, state) {
  root.dataset.state = state;
  $(".label", root).textContent = STATUS_LABELS[state] ?? state;
}

/** Fullscreen for an element, standard API first (webkit prefix for older Safari). */
export function toggleFullscreen(target) {
  const active = document.fullscreenElement ?? document.webkitFullscreenElement;
  if (active) {
    return (document.exitFullscreen ?? document.webkitExitFullscreen).call(document);
  }
  const request = target.requestFullscreen ?? target.webkitRequestFullscreen;
  if (!request) return Promise.reject(new Error("fullscreen is not available here"));
  return Promise.resolve(request.call(target));
}

/** True when a key press belongs to a text field (shortcuts must not steal it). */
export function typingIn(event) {
  const target = event.target;
  return (
    target instanceof HTMLElement &&
    (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName))
  );
}

/** Shows a stream in a <video> and starts it (muted autoplay is allowed everywhere). */
export function attach(video, stream) {
  video.srcObject = stream;
  if (stream) {
    video.play().catch(() => {
      // Autoplay may wait for a gesture on some browsers; Start was one, so this is rare.
    });
  }
}

/** A remembered setting, or ``fallback`` when there is none or storage is disabled. */
export function stored(key, fallback = null) {
  try {
    return localStorage.getItem(key) ?? fallback;
  } catch {
    return fallback;
  }
}

/** Remembers a setting; a no-op where storage is disabled (private mode, full quota). */
export function store(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // The setting then lasts for this page only.
  }
}
