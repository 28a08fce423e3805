// Drives coachd's /chat page in headless Chromium (Playwright) against real coachd servers that
// tests/browser.rs starts (fake LLM upstream answering `echo: <message>`, one word per token,
// paced so a reply streams for a while). Every check is made on what the page shows; the one
// thing done from outside the page is the operator's disconnect, a real server-side close.
//
// Environment (set by tests/browser.rs):
//   COACHD_OPEN_URL    coachd with no API key: the page works with a user id alone
//   COACHD_KEYED_URL   coachd with an API key and JWT verification: the page uses a JWT
//   COACHD_JWT         a valid JWT for the keyed server; COACHD_JWT_SUB its user
//   COACHD_API_KEY     the keyed server's API key (for the operator's disconnect only)
//   COACHD_NOTES_SUMMARY / COACHD_NOTES_ACTION   what the fake's session notes say
//   CHROMIUM           the browser (default /usr/bin/chromium)
//   OUT_DIR            where screenshots go
// Prints one JSON line (the sessions it used) last on stdout; exits 1 on the first failed check.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run through cargo test --test browser)`);
  return v;
};
const OPEN = env("COACHD_OPEN_URL");
const KEYED = env("COACHD_KEYED_URL");
const JWT = env("COACHD_JWT");
const JWT_SUB = env("COACHD_JWT_SUB");
const API_KEY = env("COACHD_API_KEY");
const NOTES_SUMMARY = env("COACHD_NOTES_SUMMARY");
const NOTES_ACTION = env("COACHD_NOTES_ACTION");
const OUT = env("OUT_DIR");
mkdirSync(OUT, { recursive: true });

// What the fake upstream answers (its echo script).
const echo = (text) => `echo: ${text}`;
const words = (prefix, n) => Array.from({ length: n }, (_, i) => `${prefix}${i + 1}`).join(" ");

const summary = { sessions: {}, checks: [] };
let current = "start";
const step = (name) => {
  current = name;
  summary.checks.push(name);
  console.error(`browser: [${((performance.now()) / 1000).toFixed(1)} s] ${name}`);
};
const assert = (ok, what) => {
  if (!ok) throw new Error(`${current}: ${what}`);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
});
let page;

const coach = (turn) => `.msg.coach[data-turn="${turn}"]`;
const turnBody = (p, turn) => p.locator(`${coach(turn)} .body`).textContent();

/** Waits until turn `turn` shows some text while it is still streaming; returns that text. */
async function streamingText(p, turn, minWords = 1) {
  const handle = await p.waitForFunction(
    ([sel, min]) => {
      const a = document.querySelector(sel);
      if (!a || a.dataset.state !== "streaming") return false;
      const text = a.querySelector(".body").textContent;
      return text.trim().split(/\s+/).length >= min ? text : false;
    },
    [coach(turn), minWords],
  );
  return handle.jsonValue();
}

async function finished(p, turn, state = "done") {
  await p.waitForFunction(
    ([sel, want]) => {
      const a = document.querySelector(sel);
      return a && a.dataset.state !== "streaming" && a.dataset.state === want;
    },
    [coach(turn), state],
  );
}

/** Records every change of the connection status line from now on, with the state of the
 * latest reply at that moment. */
async function watchConnection(p) {
  await p.evaluate(() => {
    const conn = document.getElementById("conn");
    window.__connLog = [];
    const record = () => {
      const replies = document.querySelectorAll(".msg.coach");
      const last = replies[replies.length - 1];
      window.__connLog.push({
        ...conn.dataset,
        text: conn.textContent,
        reply: last && { state: last.dataset.state, text: last.querySelector(".body").textContent },
      });
    };
    new MutationObserver(record).observe(conn, { attributes: true, childList: true, characterData: true, subtree: true });
  });
}
const connLog = (p) => p.evaluate(() => window.__connLog);

async function disconnect(baseUrl, sessionId, headers = {}) {
  const r = await fetch(`${baseUrl}/realtime/sessions/${sessionId}/disconnect`, { method: "POST", headers });
  const body = await r.json();
  assert(r.ok, `disconnect answered ${r.status} ${JSON.stringify(body)}`);
  return body.disconnected;
}

async function sendByKeyboard(p, text) {
  const box = p.getByLabel("Message");
  await box.fill(text);
  await box.press("Enter");
}

async function endWithNotes(p) {
  await p.getByRole("button", { name: "End session" }).click();
  const notes = p.getByRole("region", { name: "Session notes" });
  await notes.waitFor({ state: "visible" });
  assert((await p.locator("#notes-summary").textContent()) === NOTES_SUMMARY, "the notes' summary is shown");
  const actions = await p.locator("#notes-actions li").allTextContents();
  assert(actions.length === 1 && actions[0].startsWith(NOTES_ACTION), `the action item is shown: ${actions}`);
  assert((await p.locator("#conn").getAttribute("data-state")) === "ended", "the page says the session ended");
  assert(await p.getByLabel("Message").isDisabled(), "no more messages after the end");
}

try {
  // ---- No API key configured: a user id is enough; WebSocket. ----------------------------
  const context = await browser.newContext({ viewport: { width: 900, height: 860 } });
  page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));

  step("the page loads the coaches and labels every control");
  await page.goto(`${OPEN}/chat`);
  await page.waitForFunction(() => document.querySelectorAll("#persona option").length > 0);
  for (const label of ["Coach", "User id", "Or sign in with a JWT"]) {
    assert(await page.getByLabel(label).isVisible(), `a visible control labelled ${label}`);
  }
  await page.getByLabel("Coach").selectOption("sales");

  step("a session starts from the keyboard over a WebSocket");
  await page.getByLabel("User id").fill("browser-user");
  await page.getByLabel("User id").press("Enter");
  await page.waitForSelector('#conn[data-state="open"][data-transport="websocket"]');
  const openSession = await page.locator("#chat").getAttribute("data-session-id");
  summary.sessions.open = openSession;
  const log = page.getByRole("log", { name: "Conversation" });
  assert((await log.getAttribute("aria-live")) === "polite", "the conversation is a polite live region");
  assert(await page.getByLabel("Message").evaluate((el) => el === document.activeElement), "focus moves to the message box");

  step("a reply streams token by token and renders as safe Markdown");
  // One word per token: each piece of Markdown arrives whole, so every partial rendering is a
  // prefix of the final one.
  const rich = "My pitch plan: open with the **problem**, ask `why`, skip <img src=x onerror=window.__xss=1> tricks " +
    "and [bad](javascript:window.__xss=2) links, then read the [guide](https://example.com/guide) and practise " +
    "twice before Friday with a colleague who plays the buyer.";
  await sendByKeyboard(page, rich);
  const early = await streamingText(page, 1, 3);
  const fullText = "echo: My pitch plan: open with the problem, ask why, skip <img src=x onerror=window.__xss=1> tricks " +
    "and bad links, then read the guide and practise twice before Friday with a colleague who plays the buyer.";
  assert(early.length < fullText.length && fullText.startsWith(early.replace(/▍$/, "")),
    `text shown while streaming is a prefix of the reply: ${JSON.stringify(early)}`);
  assert((await page.locator(coach(1)).getAttribute("aria-busy")) === "true", "a streaming reply is aria-busy");
  await finished(page, 1);
  assert((await turnBody(page, 1)) === fullText, `the reply is complete: ${await turnBody(page, 1)}`);
  assert((await page.locator(coach(1)).getAttribute("data-source")) === "tokens", "the streamed tokens make the reply exactly");
  assert((await page.locator(`${coach(1)} strong`).textContent()) === "problem", "**problem** is <strong>");
  assert((await page.locator(`${coach(1)} code`).textContent()) === "why", "`why` is <code>");
  assert((await page.locator("#log img").count()) === 0, "model HTML never becomes an element");
  const links = await page.locator(`${coach(1)} a`).evaluateAll((as) => as.map((a) => [a.textContent, a.getAttribute("href"), a.rel]));
  assert(links.length === 1 && links[0][0] === "guide" && links[0][1] === "https://example.com/guide" && links[0][2].includes("noopener"),
    `only the https link is a link: ${JSON.stringify(links)}`);
  assert(await page.evaluate(() => window.__xss === undefined), "nothing from the reply ran");
  assert((await page.locator(coach(1)).getAttribute("aria-busy")) === "false", "a finished reply is not busy");

  step("stop cancels a reply mid-stream");
  const objections = "Tell me everything about handling price objections, step by step, with examples for small " +
    "and large customers, and what to say when they ask for a discount, a longer trial, or a comparison with the " +
    "cheapest competitor on the market today.";
  const long = `${objections} ${objections}`;
  await page.getByLabel("Message").fill(long);
  await page.getByRole("button", { name: "Send" }).click();
  await streamingText(page, 2, 3);
  await page.getByRole("button", { name: "Stop" }).click();
  await finished(page, 2, "cancelled");
  const partial = await turnBody(page, 2);
  assert(partial.length > "echo: ".length && partial.length < echo(long).length && echo(long).startsWith(partial),
    `a partial reply stays: ${JSON.stringify(partial)}`);
  assert((await page.locator(`${coach(2)} .meta`).textContent()) === "Stopped.", "the reply says it was stopped");
  assert(await page.getByRole("button", { name: "Stop" }).isDisabled(), "nothing to stop any more");

  step("the server closing the WebSocket mid-reply is survived without a lost or doubled token");
  await watchConnection(page);
  const third = "Can you help me rehearse the opening of tomorrow's call? I want the first minute to be about " +
    "their goals, then one story from a similar customer, then a clear question that invites them to talk.";
  await sendByKeyboard(page, third);
  await streamingText(page, 3, 4);
  const dropped = await disconnect(OPEN, openSession);
  assert(dropped >= 1, `the server dropped the page's connection (${dropped})`);
  await finished(page, 3);
  assert((await turnBody(page, 3)) === echo(third), `the reply is whole and once: ${await turnBody(page, 3)}`);
  assert((await page.locator(coach(3)).getAttribute("data-source")) === "tokens", "streamed tokens alone make the reply (no gap, no duplicate)");
  const seen = await connLog(page);
  const lost = seen.findIndex((s) => s.state === "reconnecting");
  assert(lost >= 0, `the page showed the connection was lost: ${JSON.stringify(seen)}`);
  assert(seen[lost].code === "4004", `closed by the server with 4004: ${JSON.stringify(seen[lost])}`);
  assert(seen[lost].reply.state === "streaming" && seen[lost].reply.text.length < echo(third).length,
    `the socket closed mid-reply: ${JSON.stringify(seen[lost].reply)}`);
  assert(seen.slice(lost).some((s) => s.state === "open" && s.transport === "websocket"), "and reconnected over the WebSocket");
  assert((await page.locator(".msg.user").count()) === 3 && (await page.locator(".msg.coach").count()) === 3,
    "each message and reply shows once");

  step("ending the session shows the notes and action items");
  await endWithNotes(page);
  await page.setViewportSize({ width: 900, height: 1500 });
  await page.locator("#log").evaluate((log) => { log.scrollTop = 0; });
  // Tall enough for the whole conversation in its scrolling log; the page itself, not the viewport.
  await page.locator("body").screenshot({ path: join(OUT, "chat.png") });

  step("the page fits a phone's width");
  await page.setViewportSize({ width: 375, height: 760 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert(overflow <= 0, `no sideways scrolling at 375 px (${overflow} px too wide)`);
  await page.screenshot({ path: join(OUT, "chat-phone.png"), fullPage: true });
  assert(pageErrors.length === 0, `no script errors: ${pageErrors}`);
  await context.close();

  // ---- API key and JWT verification configured; the WebSocket blocked: SSE. ---------------
  const keyed = await browser.newContext({ viewport: { width: 900, height: 860 } });
  // A network that breaks WebSockets: the upgrade "succeeds" and the socket closes at once.
  await keyed.routeWebSocket(/\/realtime\/sessions\/[^/]+\/ws/, (ws) => ws.close({ code: 1011, reason: "blocked by the test" }));
  page = await keyed.newPage();

  step("with API keys configured the page needs a JWT, and takes the user from it");
  await page.goto(`${KEYED}/chat`);
  await page.locator("#start-error").filter({ hasText: "Cannot list the coaches" }).waitFor();
  await page.getByLabel("Or sign in with a JWT").fill(JWT);
  await page.waitForFunction(() => document.querySelectorAll("#persona option").length > 0);
  await page.getByRole("button", { name: "Start session" }).click();

  step("a blocked WebSocket falls back to SSE, and the reply still streams");
  await page.waitForSelector('#conn[data-state="open"][data-transport="sse"]');
  const sseSession = await page.locator("#chat").getAttribute("data-session-id");
  summary.sessions.sse = sseSession;
  assert((await page.locator("#session-info").textContent()).includes(`user ${JWT_SUB}`), "the session is the JWT's user's");
  await watchConnection(page);
  const sse = words("e", 30);
  await sendByKeyboard(page, sse);
  await streamingText(page, 1, 3);

  step("the server dropping the event stream mid-reply is survived too");
  const droppedSse = await disconnect(KEYED, sseSession, { "x-api-key": API_KEY });
  assert(droppedSse >= 1, `the server dropped the event stream (${droppedSse})`);
  await finished(page, 1);
  assert((await turnBody(page, 1)) === echo(sse), `the reply is whole and once: ${await turnBody(page, 1)}`);
  assert((await page.locator(coach(1)).getAttribute("data-source")) === "tokens", "no gap, no duplicate over SSE");
  const sseSeen = await connLog(page);
  const sseLost = sseSeen.find((s) => s.state === "reconnecting");
  assert(sseLost, `the page showed the stream was lost: ${JSON.stringify(sseSeen)}`);
  assert(sseLost.reply.state === "streaming" && sseLost.reply.text.length < echo(sse).length,
    `the stream closed mid-reply: ${JSON.stringify(sseLost.reply)}`);
  assert(sseSeen.at(-1).state === "open" && sseSeen.at(-1).transport === "sse", "and is connected again");

  step("stop works over SSE (POST cancel with the session token)");
  await sendByKeyboard(page, words("c", 80));
  await streamingText(page, 2, 3);
  await page.getByLabel("Message").press("Escape");
  await finished(page, 2, "cancelled");

  step("ending works with the session token alone");
  await endWithNotes(page);

  step("when SSE is blocked too, HTTP turns still answer");
  const httpPage = await keyed.newPage();
  await httpPage.route(/\/realtime\/sessions\/[^/]+\/events/, (route) => route.abort("blockedbyclient"));
  await httpPage.goto(`${KEYED}/chat`);
  await httpPage.getByLabel("Or sign in with a JWT").fill(JWT);
  await httpPage.waitForFunction(() => document.querySelectorAll("#persona option").length > 0);
  await httpPage.getByRole("button", { name: "Start session" }).click();
  await httpPage.waitForSelector('#conn[data-state="open"][data-transport="http"]');
  summary.sessions.http = await httpPage.locator("#chat").getAttribute("data-session-id");
  await sendByKeyboard(httpPage, "over plain http");
  await finished(httpPage, 1);
  assert((await turnBody(httpPage, 1)) === echo("over plain http"), "the HTTP turn's reply is shown");
  await keyed.close();
} catch (e) {
  console.error(`browser: FAILED ${e.stack || e}`);
  if (page) await page.screenshot({ path: join(OUT, "failure.png"), fullPage: true }).catch(() => {});
  await browser.close();
  process.exit(1);
}
await browser.close();
console.log(JSON.stringify(summary));
