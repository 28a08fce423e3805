// markdown.js — renders the Markdown a model writes into DOM nodes, never through innerHTML, so
// text from a model (or a user) can never become markup: every piece of text ends up in a text
// node, and only the elements below are ever created. Links keep only http(s) and mailto URLs.
//
// The subset: paragraphs (line breaks kept), headings (# to ######, shown two levels down so a
// reply never outranks the page), bullet and numbered lists, block quotes, fenced code blocks,
// horizontal rules; inline code, **strong**, *emphasis* / _emphasis_, [links](https://…) and
// backslash escapes. Anything unfinished (a reply still streaming) shows as the text it is.

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function el(name, className) {
  const node = document.createElement(name);
  if (className) node.className = className;
  return node;
}

/** The URL if a link may point there (http, https, mailto; relative ones resolve to this page's). */
export function safeUrl(raw) {
  try {
    const url = new URL(raw, window.location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

const isWordChar = (c) => c !== undefined && /[\p{L}\p{N}]/u.test(c);
const isSpace = (c) => c === undefined || /\s/.test(c);

/** Where `marker` closes emphasis opened before `from`, or -1. */
function findClose(text, marker, from) {
  let i = from;
  while (i < text.length) {
    const at = text.indexOf(marker, i);
    if (at < 0) return -1;
    const closesHere = !isSpace(text[at - 1]) && at > from &&
      (marker[0] !== "_" || !isWordChar(text[at + marker.length]));
    if (closesHere && !(marker.length === 1 && text[at + 1] === marker)) return at;
    i = at + marker.length;
  }
  return -1;
}

const LINK = /^\[([^\]\n]*)\]\(([^()\s]*)\)/;

/** Appends the inline Markdown of `text` to `parent`. */
export function renderInline(text, parent) {
  let buf = "";
  const flush = () => {
    if (buf) parent.append(document.createTextNode(buf));
    buf = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && /[\\`*_[\]()#+\-.!>~|]/.test(text[i + 1])) {
      buf += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      const end = text.indexOf("`", i + 1);
      if (end > i + 1) {
        flush();
        const code = el("code");
        code.textContent = text.slice(i + 1, end);
        parent.append(code);
        i = end + 1;
        continue;
      }
    }
    if (c === "*" || c === "_") {
      const marker = text[i + 1] === c ? c + c : c;
      const start = i + marker.length;
      const opens = !isSpace(text[start]) && (c !== "_" || !isWordChar(text[i - 1]));
      const end = opens ? findClose(text, marker, start) : -1;
      if (end > start) {
        flush();
        const node = el(marker.length === 2 ? "strong" : "em");
        renderInline(text.slice(start, end), node);
        parent.append(node);
        i = end + marker.length;
        continue;
      }
      buf += marker;
      i += marker.length;
      continue;
    }
    if (c === "[") {
      const m = LINK.exec(text.slice(i));
      const href = m && safeUrl(m[2]);
      if (m && href) {
        flush();
        const a = el("a");
        a.href = href;
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        renderInline(m[1] || m[2], a);
        parent.append(a);
        i += m[0].length;
        continue;
      }
      if (m) {
        // A link to somewhere not allowed (javascript:, data:, ...): its text only.
        flush();
        renderInline(m[1], parent);
        i += m[0].length;
        continue;
      }
    }
    buf += c;
    i += 1;
  }
  flush();
}

const FENCE = /^\s{0,3}(```|~~~)/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;

/** The Markdown `text` as a DocumentFragment. */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let para = null; // lines of the open paragraph
  let list = null; // {node, ordered, item}
  let quote = null; // lines of the open block quote

  const closePara = () => {
    if (para) {
      const p = el("p");
      renderInline(para.join("\n"), p);
      out.append(p);
      para = null;
    }
  };
  const closeQuote = () => {
    if (quote) {
      const q = el("blockquote");
      q.append(renderMarkdown(quote.join("\n")));
      out.append(q);
      quote = null;
    }
  };
  const closeList = () => {
    list = null;
  };
  const closeAll = () => {
    closePara();
    closeQuote();
    closeList();
  };

  for (let n = 0; n < lines.length; n++) {
    const line = lines[n];
    const fence = FENCE.exec(line);
    if (fence) {
      closeAll();
      const body = [];
      n += 1;
      while (n < lines.length && !lines[n].trimStart().startsWith(fence[1])) {
        body.push(lines[n]);
        n += 1;
      }
      const pre = el("pre");
      const code = el("code");
      code.textContent = body.join("\n");
      pre.append(code);
      out.append(pre);
      continue;
    }
    if (!line.trim()) {
      closeAll();
      continue;
    }
    const q = QUOTE.exec(line);
    if (q) {
      closePara();
      closeList();
      (quote ||= []).push(q[1]);
      continue;
    }
    closeQuote();
    const h = HEADING.exec(line);
    if (h) {
      closeAll();
      const node = el("h" + Math.min(6, h[1].length + 2));
      renderInline(h[2], node);
      out.append(node);
      continue;
    }
    if (RULE.test(line)) {
      closeAll();
      out.append(el("hr"));
      continue;
    }
    const bullet = BULLET.exec(line);
    const numbered = bullet ? null : NUMBERED.exec(line);
    if (bullet || numbered) {
      closePara();
      const ordered = Boolean(numbered);
      if (!list || list.ordered !== ordered) {
        const node = el(ordered ? "ol" : "ul");
        if (ordered && numbered[1] !== "1") node.start = Number(numbered[1]);
        out.append(node);
        list = { node, ordered, item: null };
      }
      const li = el("li");
      renderInline(ordered ? numbered[2] : bullet[1], li);
      list.node.append(li);
      list.item = li;
      continue;
    }
    if (list && /^\s+\S/.test(line)) {
      // An indented line continues the list item above.
      list.item.append(document.createTextNode("\n"));
      renderInline(line.trim(), list.item);
      continue;
    }
    closeList();
    (para ||= []).push(line);
  }
  closeAll();
  return out;
}
