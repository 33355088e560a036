// The HTTP side of livediff as the page uses it: the JSON API, WHEP, health and the bearer token.

const TOKEN_KEY = "livediff.token";

/** A request the server refused (status >= 400) or could not be sent at all (status 0). */
export class ApiError extends Error {
  constructor(status, detail, retryAfterS = null) {
    super(describeStatus(status, detail, retryAfterS));
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
    this.retryAfterS = retryAfterS;
  }

  /** Field errors of a 422 as [{field, message}], the "body"/"params"/"query" prefix removed. */
  get fieldErrors() {
    if (this.status !== 422 || !Array.isArray(this.detail)) return [];
    return this.detail.map((error) => fieldError(error));
  }
}

/** The parts a route puts before a param's name in a loc (e.g. ["body", "params"]). */
const LOC_PREFIXES = ["body", "params", "query"];

/** {field, path, message} for one pydantic error ({loc, msg}) whatever prefix the route gave its
 * loc; ``path`` is the rest of the loc inside the field (e.g. [0, "model_id"] in a list, or
 * ["processors", 0, "params", "feedback_strength"] in a processing block). */
export function fieldError(error) {
  const loc = Array.isArray(error.loc) ? error.loc : [];
  const start = loc.findIndex((part) => !LOC_PREFIXES.includes(part));
  const path = start < 0 ? [] : loc.slice(start);
  return {
    field: path.length ? String(path[0]) : "",
    path: path.slice(1),
    message: String(error.msg ?? error).replace(/^Value error, /, ""),
  };
}

/** One line of text for an error detail: a string, or pydantic's list of field errors. */
export function formatDetail(detail) {
  if (Array.isArray(detail)) {
    return detail
      .map((error) => {
        const { field, path, message } = fieldError(error);
        return field ? `${[field, ...path].join(".")}: ${message}` : message;
      })
      .join("; ");
  }
  if (detail && typeof detail === "object") return JSON.stringify(detail);
  return String(detail ?? "");
}

function describeStatus(status, detail, retryAfterS) {
  const text = formatDetail(detail);
  if (status === 0) {
    return (
      `Cannot reach the livediff server at ${location.origin}. ` +
      "Check that `livediff serve` is running and try again."
    );
  }
  if (status === 401) {
    return "This server needs an access token. Enter it with the key button at the top, then press Start.";
  }
  if (status === 503) {
    const wait = retryAfterS ? ` Try again in ${retryAfterS} s.` : "";
    return `The server cannot take a new session right now: ${text}.${wait}`;
  }
  if (status === 404) return `Not found: ${text}.`;
  if (status === 422) return `The server refused these settings: ${text}.`;
  if (status >= 500) return `The server failed (HTTP ${status}): ${text || "no details"}.`;
  return `The server refused the request (HTTP ${status}): ${text}.`;
}

let sessionToken = readToken();

export function readToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function saveToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage can be disabled (private mode): the token then lives for this page only.
  }
  sessionToken = token;
}

/**
 * Moves a token given in the address (`/#token=...`, or `?token=...`) into storage and out of
 * the address bar, so that it is not shared by accident. Prefer the fragment: browsers never
 * send it, so it stays out of server and proxy logs. When both are given, the fragment wins.
 */
export function takeTokenFromUrl() {
  const url = new URL(location.href);
  const fragment = new URLSearchParams(url.hash.slice(1));
  const token = fragment.get("token") ?? url.searchParams.get("token");
  if (token === null) return;
  saveToken(token);
  url.searchParams.delete("token");
  fragment.delete("token");
  url.hash = fragment.toString();
  history.replaceState(null, "", url);
}

export function currentToken() {
  return sessionToken;
}

/** The ICE servers announced in WHIP Link headers (RFC 9725 4.6) as RTCIceServer objects. */
export function parseIceLinks(header) {
  const servers = [];
  for (const match of (header || "").matchAll(/<([^>]+)>([^<]*)/g)) {
    const params = Object.fromEntries(
      [...match[2].matchAll(/;\s*([\w-]+)\s*=\s*"?([^";]*)"?/g)].map((m) => [m[1].toLowerCase(), m[2]]),
    );
    if (params.rel !== "ice-server") continue;
    const server = { urls: match[1] };
    if (params.username) server.username = params.username;
    if (params.credential) server.credential = params.credential;
    servers.push(server);
  }
  return servers;
}

/**
 * Where the API is: the folder the page was served from, so the studio works at the root and
 * under a prefix the server never sees (a Livepeer orchestrator proxies a runner's app at
 * `/apps/{runner}/session/{session}/app/`).
 */
export function pageBase(href = location.href) {
  return new URL(".", href).pathname.replace(/\/$/, "");
}

export class Api {
  constructor(base = pageBase()) {
    this.base = base;
  }

  headers(extra = {}) {
    const token = currentToken();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
  }

  async request(method, path, { json, sdp, keepalive = false, signal } = {}) {
    const init = { method, headers: this.headers(), keepalive, signal };
    if (json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(json);
    } else if (sdp !== undefined) {
      init.headers["Content-Type"] = "application/sdp";
      init.body = sdp;
    }
    let response;
    try {
      response = await fetch(this.base + path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, String(error.message || error));
    }
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  async json(method, path, options) {
    const response = await this.request(method, path, options);
    return response.status === 204 ? null : response.json();
  }

  pipeline() {
    return this.json("GET", "/v1/pipeline");
  }

  async health() {
    return (await this.json("GET", "/health")).status;
  }

  openSession(sdp, params) {
    return this.json("POST", "/v1/sessions", { json: { sdp, type: "offer", params } });
  }

  session(id, signal) {
    return this.json("GET", `/v1/sessions/${encodeURIComponent(id)}`, { signal });
  }

  patchParams(id, patch) {
    return this.json("PATCH", `/v1/sessions/${encodeURIComponent(id)}/params`, { json: patch });
  }

  closeSession(id, { keepalive = false } = {}) {
    return this.request("DELETE", `/v1/sessions/${encodeURIComponent(id)}`, { keepalive });
  }

  /** ICE servers the server announces (none on a plain local setup). */
  async iceServers() {
    try {
      const response = await fetch(`${this.base}/whip`, { method: "OPTIONS" });
      return response.ok ? parseIceLinks(response.headers.get("Link")) : [];
    } catch {
      return [];
    }
  }

  /** Watch a session over WHEP; returns {sdp, location} (location: the viewer's resource). */
  async watch(sessionId, sdp) {
    const path = `/whep/${encodeURIComponent(sessionId)}`;
    const response = await this.request("POST", path, { sdp });
    return { sdp: await response.text(), location: response.headers.get("Location") };
  }

  async leave(location) {
    await this.request("DELETE", location, { keepalive: true });
  }
}

async function errorFrom(response) {
  let detail = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && "detail" in body) detail = body.detail;
  } catch {
    // Not JSON (a proxy's error page, say): keep the status text.
  }
  const retryAfter = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
  return new ApiError(response.status, detail, Number.isFinite(retryAfter) ? retryAfter : null);
}
