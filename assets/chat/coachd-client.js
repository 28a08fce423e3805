// coachd-client.js — a browser client of coachd's realtime protocol, with no dependencies.
//
// The contract is proto/README.md (sessions, seq, replay, transports, close codes) with the frames
// of proto/client.schema.json (what this sends) and proto/server.schema.json (what it receives).
// Copy this file into any front end; the /chat page of coachd is one user of it (app.js).
//
//   import { createSession, listPersonas, SessionClient } from "./coachd-client.js";
//   const created = await createSession({ userId: "u1", coachId: "sales" });   // or { jwt }
//   const client = new SessionClient(created, {
//     onEvent: (event) => { ... },      // every server event once, in seq order (see below)
//     onStatus: (status) => { ... },    // connection state changes
//   });
//   client.connect();
//   await client.send("Hello");          // a user_message; the reply arrives as events
//   await client.cancel();              // stop the reply streaming now
//   const ended = await client.end({ generateNotes: true });   // {notes: {summary, key_points, action_items}, ...}
//
// Transports, tried in this order (option `transports`):
//   "websocket"  GET /realtime/sessions/{id}/ws?token=&after_seq=  — frames both ways.
//   "sse"        GET /realtime/sessions/{id}/events?token=&after_seq=  for events, and
//                POST …/turn and POST …/cancel (header X-Session-Token) for what the user does.
//   "http"       POST …/turn answered with JSON once the reply is complete (no streaming); the
//                client emits a turn_start and a turn_end event built from that answer (seq null).
// A transport that cannot be opened at the first try (a WebSocket that closes, or stays silent for
// `helloTimeoutMs`, before its first `session` event; an event stream that errors before it
// opens) makes the client move to the next one; one that fails `maxFailures` times in a row after
// having worked does too.
//
// Reconnects and exactly-once delivery: every logged server event carries a seq, monotonic per
// session. The client remembers the highest seq it delivered (`lastSeq`) and reconnects with
// `after_seq=lastSeq`, so the server replays exactly what was missed; an event whose seq is not
// above `lastSeq` is a duplicate and is dropped. Only the event types that are always logged
// (turn_start, token, turn_end, notes, job, and an error of a turn) move `lastSeq`: `session`,
// `pong`, `resync` and connection errors (slow_client, disconnected, invalid_frame,
// server_shutdown) may carry the latest seq of the session without being part of the log (a
// WebSocket's first event, say), so they are delivered without moving it. A `resync` means the
// missed events are gone from the log: `lastSeq` jumps to its `state.last_seq`.
//
// Credentials: the session token returned at creation is the only credential this client uses
// after creation (in `?token=` where browsers cannot set headers, in X-Session-Token elsewhere).
// Creating a session needs an API key where keys are configured, which a browser must never
// hold; where coachd verifies end-user JWTs (SUPABASE_JWT_SECRET), `createSession({jwt})` sends
// the user's JWT instead and the session is that user's.

/** Close codes after which a WebSocket must not be reopened (proto/README.md). */
const FINAL_CLOSE_CODES = new Set([1000, 1003, 1007, 1008, 1009]);

/** Connection errors: per-connection `error` events that say why the connection closes. */
const CONNECTION_ERRORS = new Set(["slow_client", "disconnected", "server_shutdown", "invalid_frame"]);

/** An HTTP failure with coachd's `{"error":{"code","message"}}` body. */
export class CoachdError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "CoachdError";
    this.status = status;
    this.code = code;
  }
}

function joinUrl(baseUrl, path) {
  return (baseUrl || "").replace(/\/+$/, "") + path;
}

async function request(method, url, { headers = {}, body } = {}) {
  const init = { method, headers: { ...headers } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new CoachdError(0, "network", `cannot reach coachd: ${e.message || e}`);
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const err = json && json.error;
    throw new CoachdError(response.status, err ? err.code : "http_" + response.status,
      err ? err.message : `HTTP ${response.status}`);
  }
  return json;
}

function bearer(jwt) {
  return jwt ? { authorization: "Bearer " + jwt } : {};
}

/** `GET /ai/coach/personas`: `[{id, name, domain, aliases}]`. */
export async function listPersonas({ baseUrl = "", jwt } = {}) {
  const body = await request("GET", joinUrl(baseUrl, "/ai/coach/personas"), { headers: bearer(jwt) });
  return body.personas;
}

/**
 * `POST /realtime/sessions`. With `jwt`, the user is the token's (`userId` may be left out; a
 * different one is refused with 403). Returns the server's answer plus `baseUrl`.
 */
export async function createSession({ baseUrl = "", userId, coachId, jwt, transport = "websocket" }) {
  const body = { coach_id: coachId, transport };
  if (userId) body.user_id = userId;
  const created = await request("POST", joinUrl(baseUrl, "/realtime/sessions"), { headers: bearer(jwt), body });
  return { ...created, baseUrl };
}

/** Whether an event is part of the session's log (and so moves `lastSeq`). */
function isLogged(event) {
  switch (event.type) {
    case "turn_start":
    case "token":
    case "turn_end":
    case "notes":
    case "job":
      return true;
    case "error":
      return event.turn_number !== undefined && !CONNECTION_ERRORS.has(event.code);
    default:
      return false;
  }
}

/** One live session over the best transport that works. */
export class SessionClient {
  /**
   * @param created the answer of {@link createSession}
   * @param options.onEvent called with every server event, once, in order
   * @param options.onStatus called with `{state, transport, reason?, code?}`; state is one of
   *   connecting, open, reconnecting, fallback, ended, failed
   * @param options.transports transports to try, in order (default websocket, sse, http)
   * @param options.maxFailures failed reconnects in a row before moving to the next transport
   * @param options.backoffMs first reconnect delay, doubled per failure up to 5 s
   * @param options.helloTimeoutMs how long a new WebSocket may stay silent before it counts as
   *   failed (a proxy that accepts the upgrade and then passes nothing)
   */
  constructor(created, options = {}) {
    this.sessionId = created.session_id;
    this.token = created.token;
    this.baseUrl = created.baseUrl || "";
    this.onEvent = options.onEvent || (() => {});
    this.onStatus = options.onStatus || (() => {});
    this.transports = options.transports || ["websocket", "sse", "http"];
    this.maxFailures = options.maxFailures ?? 4;
    this.backoffMs = options.backoffMs ?? 150;
    this.helloTimeoutMs = options.helloTimeoutMs ?? 5000;
    this.lastSeq = 0;
    this.transportIndex = 0;
    this.failures = 0;
    this.everOpened = false;
    this.ended = false;
    this.socket = null;
    this.source = null;
    this.timer = null;
    this.nextClientId = 1;
  }

  /** The transport in use: websocket, sse or http. */
  get transport() {
    return this.transports[this.transportIndex];
  }

  url(path) {
    return joinUrl(this.baseUrl, `/realtime/sessions/${encodeURIComponent(this.sessionId)}${path}`);
  }

  streamUrl(path) {
    const q = `?token=${encodeURIComponent(this.token)}&after_seq=${this.lastSeq}`;
    return this.url(path) + q;
  }

  authHeaders() {
    return { "x-session-token": this.token };
  }

  status(state, extra = {}) {
    this.onStatus({ state, transport: this.transport, ...extra });
  }

  /** Opens the first transport that works. */
  connect() {
    this.open();
  }

  open() {
    if (this.ended) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.status(this.failures === 0 && !this.everOpened ? "connecting" : "reconnecting",
      { attempt: this.failures });
    switch (this.transport) {
      case "websocket":
        return this.openWebSocket();
      case "sse":
        return this.openEventSource();
      default:
        // HTTP turns need no connection: each turn is one request.
        this.everOpened = true;
        this.failures = 0;
        return this.status("open");
    }
  }

  /** Delivers a server event unless it is a duplicate; returns whether it was delivered. */
  deliver(event) {
    if (isLogged(event)) {
      if (event.seq <= this.lastSeq) return false;
      this.lastSeq = event.seq;
    } else if (event.type === "resync") {
      this.lastSeq = Math.max(this.lastSeq, event.state.last_seq);
    }
    this.onEvent(event);
    return true;
  }

  openWebSocket() {
    const wsUrl = new URL(this.streamUrl("/ws"), window.location.href);
    wsUrl.protocol = wsUrl.protocol === "https:" ? "wss:" : "ws:";
    let socket;
    try {
      socket = new WebSocket(wsUrl.href);
    } catch (e) {
      return this.failed("websocket", 0, String(e.message || e));
    }
    this.socket = socket;
    // Open means coachd spoke: its first frame is the session event. A proxy that accepts the
    // upgrade and then drops the socket has not opened anything.
    let hello = false;
    const silent = setTimeout(() => {
      if (hello || this.socket !== socket) return;
      this.socket = null;
      socket.close();
      this.failed("websocket", 0, "no answer on the WebSocket");
    }, this.helloTimeoutMs);
    socket.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (!hello) {
        hello = true;
        clearTimeout(silent);
        this.everOpened = true;
        this.failures = 0;
        this.status("open");
      }
      this.deliver(event);
    };
    socket.onclose = (close) => {
      clearTimeout(silent);
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.ended) return;
      // 1000 from coachd means the session ended; before its first event it means someone else
      // closed the socket (the session check in `failed` tells which).
      if (close.code === 1000 && hello) return this.finish("the session ended");
      if (FINAL_CLOSE_CODES.has(close.code) && close.code !== 1000) {
        this.ended = true;
        return this.status("failed", { code: close.code, reason: close.reason || "protocol error" });
      }
      this.failed("websocket", close.code, close.reason, hello);
    };
  }

  openEventSource() {
    let source;
    try {
      source = new EventSource(this.streamUrl("/events"));
    } catch (e) {
      return this.failed("sse", 0, String(e.message || e));
    }
    this.source = source;
    let opened = false;
    source.onopen = () => {
      opened = true;
      this.everOpened = true;
      this.failures = 0;
      this.status("open");
    };
    const onMessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      if (event.type === "error" && CONNECTION_ERRORS.has(event.code) && event.turn_number === undefined) {
        // The server closes this stream next; reconnect at once from our own lastSeq (never
        // from the seq this event carries, which may be ahead of what reached us).
        source.close();
        if (this.source === source) this.source = null;
        if (event.code === "server_shutdown") this.onEvent(event);
        return this.failed("sse", 0, event.code, true);
      }
      this.deliver(event);
      if (event.type === "session" && event.status === "ended") {
        source.close();
        this.finish("the session ended");
      }
    };
    // Every event type of server.schema.json is named in `event:`.
    for (const type of ["session", "turn_start", "token", "turn_end", "error", "notes", "job", "resync", "pong"]) {
      source.addEventListener(type, onMessage);
    }
    source.onerror = () => {
      // EventSource would retry by itself with Last-Event-ID after a few seconds; reconnecting
      // ourselves is quicker, and keeps one rule (after_seq=lastSeq) for every transport.
      source.close();
      if (this.source !== source) return;
      this.source = null;
      if (!this.ended) this.failed("sse", 0, "event stream failed", opened);
    };
  }

  /**
   * A connection failed or closed: reconnect after a backoff, or move on to the next transport
   * (at once when this one never worked, else after `maxFailures` failed reconnects in a row).
   * Either way, first ask coachd whether the session is still there: an ended session, an
   * expired token or an unknown session is final, whatever the transport.
   */
  failed(transport, code, reason, hadOpened = false) {
    if (this.ended || transport !== this.transport) return;
    if (!hadOpened) this.failures += 1;
    const moveOn = !this.everOpened || this.failures >= this.maxFailures;
    if (!moveOn) this.status("reconnecting", { code, reason, attempt: this.failures });
    const delay = moveOn ? 0 : Math.min(5000, this.backoffMs * 2 ** Math.max(0, this.failures - 1));
    this.timer = setTimeout(async () => {
      if (!(await this.stillThere())) return;
      if (moveOn) this.fallBack(code, reason);
      else this.open();
    }, delay);
  }

  /** `GET /realtime/sessions/{id}`: false (and the client is done) when the session is over for us. */
  async stillThere() {
    try {
      const info = await request("GET", this.url(""), { headers: this.authHeaders() });
      if (info && info.status === "ended") {
        this.finish("the session ended");
        return false;
      }
    } catch (e) {
      if (e.status === 401 || e.status === 404 || e.status === 410) {
        this.ended = true;
        this.status("failed", { code: e.status, reason: e.message });
        return false;
      }
      // coachd unreachable: try anyway; that attempt's failure counts.
    }
    return !this.ended;
  }

  fallBack(code, reason) {
    if (this.transportIndex + 1 >= this.transports.length) {
      this.ended = true;
      return this.status("failed", { code, reason: reason || "no transport works" });
    }
    const from = this.transport;
    this.transportIndex += 1;
    this.failures = 0;
    this.everOpened = false;
    this.status("fallback", { from, code, reason });
    this.open();
  }

  finish(reason) {
    this.ended = true;
    clearTimeout(this.timer);
    this.status("ended", { reason });
  }

  /**
   * Sends what the user said; `mode` is queue (default) or interrupt. Resolves with the
   * `client_id` echoed in the turn's turn_start.
   */
  async send(text, { mode = "queue", clientId } = {}) {
    const client_id = clientId || `m${this.nextClientId++}`;
    const frame = { type: "user_message", text, mode, client_id };
    if (this.transport === "websocket" && this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return client_id;
    }
    if (this.transport === "http") {
      this.httpTurn(frame);
      return client_id;
    }
    // SSE (or a WebSocket that is reconnecting): the turn goes over HTTP and its events arrive
    // on the event stream. The answer comes once the turn is over; only a refusal matters here.
    const turn = request("POST", this.url("/turn"), {
      headers: this.authHeaders(),
      body: { text, mode, client_id },
    });
    turn.catch((e) => {
      if (e.status >= 400 && e.status < 500) {
        this.onEvent({ type: "error", session_id: this.sessionId, seq: null, code: e.code, message: e.message, retryable: false, client_id });
      }
    });
    return client_id;
  }

  /** An HTTP turn: its answer becomes a turn_start and a turn_end event. */
  async httpTurn({ text, mode, client_id }) {
    try {
      const reply = await request("POST", this.url("/turn"), {
        headers: this.authHeaders(),
        body: { text, mode, client_id },
      });
      const base = { session_id: this.sessionId, seq: null, turn_number: reply.turn_number };
      this.onEvent({ ...base, type: "turn_start", user_text: text, client_id });
      this.onEvent({
        ...base,
        type: "turn_end",
        reply_text: reply.reply_text,
        actions: reply.actions,
        usage: reply.usage,
        finish_reason: reply.finish_reason,
        interrupted: reply.interrupted,
        provider: reply.provider,
        model: reply.model,
      });
    } catch (e) {
      this.onEvent({ type: "error", session_id: this.sessionId, seq: null, code: e.code, message: e.message, retryable: e.status >= 500, client_id });
    }
  }

  /** Stops the reply streaming now (`cancel` frame, or POST …/cancel). */
  async cancel() {
    if (this.transport === "websocket" && this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({ type: "cancel" }));
      return true;
    }
    const body = await request("POST", this.url("/cancel"), { headers: this.authHeaders() });
    return body.cancelled;
  }

  /** Ends the session (`POST …/end`); with generateNotes, the answer carries the notes. */
  async end({ generateNotes = true } = {}) {
    const body = await request("POST", this.url("/end"), {
      headers: this.authHeaders(),
      body: { generate_notes: generateNotes },
    });
    this.close();
    this.status("ended", { reason: "the session ended" });
    return body;
  }

  /** Closes the connection without ending the session. */
  close() {
    this.ended = true;
    clearTimeout(this.timer);
    if (this.socket) {
      const s = this.socket;
      this.socket = null;
      s.close(1000);
    }
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }
}
