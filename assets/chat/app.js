// app.js — the /chat page: pick a coach, start a session, talk. The protocol is spoken by
// coachd-client.js; this module only turns its events into the page. Model text reaches the page
// through markdown.js (DOM nodes, never innerHTML).

import { CoachdError, SessionClient, createSession, listPersonas } from "./coachd-client.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const ui = {
  conn: $("conn"),
  start: $("start"),
  persona: $("persona"),
  user: $("user"),
  jwt: $("jwt"),
  startButton: $("start-button"),
  startError: $("start-error"),
  chat: $("chat"),
  info: $("session-info"),
  log: $("log"),
  composer: $("composer"),
  message: $("message"),
  send: $("send"),
  stop: $("stop"),
  end: $("end"),
  notes: $("notes"),
};

const TRANSPORT_NAMES = { websocket: "WebSocket", sse: "server-sent events", http: "HTTP turns" };

let client = null;
let reconnects = 0;
let sent = 0;
/** turn number → {article, body, meta, text, rendered} */
const turns = new Map();
/** client_id → the user's article, until its turn_start arrives */
const pendingUser = new Map();

function el(name, className, text) {
  const node = document.createElement(name);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setConn(state, text, transport, code) {
  ui.conn.dataset.state = state;
  ui.conn.dataset.code = code === undefined || code === null ? "" : String(code);
  if (transport) ui.conn.dataset.transport = transport;
  ui.conn.dataset.reconnects = String(reconnects);
  ui.conn.textContent = text;
}

function describe(err) {
  if (err instanceof CoachdError) {
    if (err.status === 401) return "Not allowed: coachd wants credentials (a valid JWT here, where it checks them).";
    if (err.status === 403) return "Not allowed: the user id does not match the JWT's user.";
    return `${err.message} (${err.code})`;
  }
  return String((err && err.message) || err);
}

// ---- coaches -------------------------------------------------------------------------------

async function loadPersonas() {
  ui.startError.textContent = "";
  try {
    const personas = await listPersonas({ jwt: ui.jwt.value.trim() || undefined });
    const chosen = ui.persona.value;
    ui.persona.replaceChildren(...personas.map((p) => {
      const option = el("option", null, `${p.name} (${p.domain})`);
      option.value = p.id;
      return option;
    }));
    if (personas.some((p) => p.id === chosen)) ui.persona.value = chosen;
  } catch (err) {
    ui.startError.textContent = "Cannot list the coaches: " + describe(err);
  }
}

// ---- the conversation ----------------------------------------------------------------------

function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function note(text) {
  ui.log.append(el("p", "note", text));
  scrollToEnd();
}

function userMessage(text, clientId) {
  const article = el("article", "msg user");
  article.append(el("span", "who", "You"), document.createTextNode(text));
  if (clientId) article.dataset.clientId = clientId;
  ui.log.append(article);
  scrollToEnd();
  return article;
}

function coachTurn(number) {
  let turn = turns.get(number);
  if (turn) return turn;
  const article = el("article", "msg coach");
  article.dataset.turn = String(number);
  article.dataset.state = "streaming";
  article.setAttribute("aria-busy", "true");
  const body = el("div", "body");
  const meta = el("p", "meta");
  article.append(el("span", "who", "Coach"), body, meta);
  ui.log.append(article);
  turn = { article, body, meta, text: "", rendered: "", frame: 0 };
  turns.set(number, turn);
  updateStop();
  scrollToEnd();
  return turn;
}

/** Re-renders a turn's Markdown at most once per frame, however many tokens arrive. */
function scheduleRender(turn) {
  if (turn.frame) return;
  turn.frame = requestAnimationFrame(() => {
    turn.frame = 0;
    renderTurn(turn);
  });
}

function renderTurn(turn) {
  if (turn.rendered === turn.text) return;
  const atEnd = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
  turn.body.replaceChildren(renderMarkdown(turn.text));
  turn.rendered = turn.text;
  if (atEnd) scrollToEnd();
}

function streaming() {
  return [...turns.values()].some((t) => t.article.dataset.state === "streaming");
}

function updateStop() {
  ui.stop.disabled = !client || !streaming();
}

function onTurnStart(event) {
  const mine = event.client_id && pendingUser.get(event.client_id);
  if (mine) {
    pendingUser.delete(event.client_id);
    mine.dataset.turn = String(event.turn_number);
  } else if (!document.querySelector(`.msg.user[data-turn="${event.turn_number}"]`)) {
    // Sent from elsewhere (another tab of the same session).
    userMessage(event.user_text).dataset.turn = String(event.turn_number);
  }
  coachTurn(event.turn_number);
}

function onToken(event) {
  const turn = coachTurn(event.turn_number);
  turn.text += event.text;
  scheduleRender(turn);
}

function onTurnEnd(event) {
  const turn = coachTurn(event.turn_number);
  // The reply as streamed is normally the reply_text exactly; when tokens were lost (a resync)
  // the final text is taken from turn_end, and the article says so.
  turn.article.dataset.source = turn.text === event.reply_text ? "tokens" : "reply_text";
  turn.text = event.reply_text;
  cancelAnimationFrame(turn.frame);
  turn.frame = 0;
  renderTurn(turn);
  const cancelled = event.finish_reason === "cancelled";
  turn.article.dataset.state = event.finish_reason === "error" ? "error" : cancelled ? "cancelled" : "done";
  turn.article.dataset.finishReason = event.finish_reason;
  if (cancelled) turn.meta.textContent = "Stopped.";
  else if (event.interrupted && event.finish_reason !== "error") turn.meta.textContent = `Interrupted (${event.finish_reason}).`;
  turn.article.setAttribute("aria-busy", "false");
  updateStop();
}

function onError(event) {
  if (event.turn_number !== undefined) {
    const turn = coachTurn(event.turn_number);
    turn.meta.textContent = event.message;
    turn.article.dataset.state = "error";
    return;
  }
  if (event.client_id && pendingUser.has(event.client_id)) {
    pendingUser.get(event.client_id).dataset.state = "error";
    pendingUser.delete(event.client_id);
  }
  note(`Error: ${event.message}`);
}

function showNotes(outcome) {
  if (!ui.notes.hidden) return;
  const notes = outcome.notes;
  $("notes-error").textContent = outcome.notes_error ? `No notes: ${outcome.notes_error.message || outcome.notes_error}` : "";
  if (notes) {
    $("notes-summary").textContent = notes.summary;
    $("notes-points").replaceChildren(...notes.key_points.map((p) => el("li", null, p)));
    $("notes-actions").replaceChildren(...notes.action_items.map((a) => {
      const li = el("li", "action");
      li.append(el("strong", null, a.task));
      const detail = [a.owner && `owner: ${a.owner}`, a.due && `due: ${a.due}`, a.priority && `priority: ${a.priority}`]
        .filter(Boolean).join(", ");
      if (detail) li.append(document.createTextNode(` — ${detail}`));
      return li;
    }));
  }
  ui.notes.hidden = false;
  ui.notes.focus();
}

function onEvent(event) {
  switch (event.type) {
    case "turn_start": return onTurnStart(event);
    case "token": return onToken(event);
    case "turn_end": return onTurnEnd(event);
    case "error": return onError(event);
    case "notes": return showNotes({ notes: event.notes });
    case "resync":
      return note("Some of the conversation could not be replayed after the reconnect.");
    case "session":
      if (event.status === "ended") endedUi();
      return undefined;
    default:
      return undefined;
  }
}

function onStatus(status) {
  const name = TRANSPORT_NAMES[status.transport] || status.transport;
  switch (status.state) {
    case "connecting":
      return setConn("connecting", "Connecting…", status.transport);
    case "open":
      return setConn("open", `Connected (${name})`, status.transport);
    case "reconnecting":
      reconnects += 1;
      return setConn("reconnecting", "Connection lost — reconnecting…", status.transport, status.code);
    case "fallback":
      return setConn("fallback", `${TRANSPORT_NAMES[status.from]} unavailable — trying ${name}`, status.transport);
    case "ended":
      endedUi();
      return setConn("ended", "Session ended", status.transport);
    default:
      endedUi();
      return setConn("failed", `Disconnected: ${status.reason || "the connection failed"}`, status.transport);
  }
}

function endedUi() {
  for (const control of [ui.message, ui.send, ui.stop, ui.end]) control.disabled = true;
}

// ---- controls ------------------------------------------------------------------------------

ui.start.addEventListener("submit", async (e) => {
  e.preventDefault();
  ui.startError.textContent = "";
  const jwt = ui.jwt.value.trim() || undefined;
  const userId = ui.user.value.trim() || undefined;
  if (!jwt && !userId) {
    ui.startError.textContent = "Give a user id, or a JWT.";
    ui.user.focus();
    return;
  }
  ui.startButton.disabled = true;
  try {
    const created = await createSession({ userId, coachId: ui.persona.value, jwt });
    client = new SessionClient(created, { onEvent, onStatus });
    ui.info.textContent = `${created.persona.name} · user ${created.user_id} · session ${created.session_id}`;
    ui.chat.dataset.sessionId = created.session_id;
    ui.start.hidden = true;
    ui.chat.hidden = false;
    client.connect();
    ui.message.focus();
  } catch (err) {
    ui.startError.textContent = "Cannot start the session: " + describe(err);
  } finally {
    ui.startButton.disabled = false;
  }
});

ui.composer.addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = ui.message.value.trim();
  if (!text || !client) return;
  ui.message.value = "";
  // Known before sending, so the turn_start that echoes it always finds this message.
  const clientId = `c${++sent}`;
  pendingUser.set(clientId, userMessage(text, clientId));
  try {
    await client.send(text, { clientId });
  } catch (err) {
    note("Not sent: " + describe(err));
  }
});

ui.message.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ui.composer.requestSubmit();
  } else if (e.key === "Escape" && streaming()) {
    e.preventDefault();
    stop();
  }
});

async function stop() {
  if (!client) return;
  ui.stop.disabled = true;
  try {
    await client.cancel();
  } catch (err) {
    note("Could not stop: " + describe(err));
    updateStop();
  }
}
ui.stop.addEventListener("click", stop);

ui.end.addEventListener("click", async () => {
  if (!client) return;
  ui.end.disabled = true;
  ui.end.textContent = "Ending…";
  try {
    showNotes(await client.end({ generateNotes: true }));
  } catch (err) {
    ui.end.disabled = false;
    note("Could not end the session: " + describe(err));
  } finally {
    ui.end.textContent = "End session";
  }
});

let jwtTimer = 0;
ui.jwt.addEventListener("input", () => {
  clearTimeout(jwtTimer);
  jwtTimer = setTimeout(loadPersonas, 300);
});

loadPersonas();
