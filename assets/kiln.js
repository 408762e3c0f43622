// kiln's log viewer: follows a build's log over server-sent events, renders
// ANSI colours, searches the whole log on the server and jumps to hits and
// to the first error. Log text only ever reaches the page as textContent.
(function () {
  "use strict";
  const pre = document.getElementById("log");
  if (!pre) return;
  const id = pre.dataset.build;
  const tail = Number(pre.dataset.tail) || 262144;
  const status = document.getElementById("log-status");
  const follow = document.getElementById("log-follow");
  const hitsBox = document.getElementById("log-hits");
  let es = null;
  let sgr = { fg: null, bg: null, bold: false };

  // SGR parameters → the state of the text that follows.
  function applySgr(params) {
    const ps = params === "" ? [0] : params.split(";").map(Number);
    for (let i = 0; i < ps.length; i++) {
      const p = ps[i];
      if (p === 0) sgr = { fg: null, bg: null, bold: false };
      else if (p === 1) sgr.bold = true;
      else if (p === 22) sgr.bold = false;
      else if (p >= 30 && p <= 37) sgr.fg = p - 30;
      else if (p >= 90 && p <= 97) sgr.fg = p - 90 + 8;
      else if (p === 39) sgr.fg = null;
      else if (p >= 40 && p <= 47) sgr.bg = p - 40;
      else if (p >= 100 && p <= 107) sgr.bg = p - 100 + 8;
      else if (p === 49) sgr.bg = null;
      else if ((p === 38 || p === 48) && ps[i + 1] === 5) i += 2; // 256 colours: ignored
      else if ((p === 38 || p === 48) && ps[i + 1] === 2) i += 4; // true colour: ignored
    }
  }

  function append(text) {
    // Escape sequences: SGR (colours) are applied, others dropped.
    const re = /\x1b\[([0-9;?]*)([A-Za-z])/g;
    let last = 0, m;
    const frag = document.createDocumentFragment();
    const emit = (s) => {
      if (!s) return;
      if (sgr.fg === null && sgr.bg === null && !sgr.bold) {
        frag.appendChild(document.createTextNode(s));
        return;
      }
      const span = document.createElement("span");
      const cls = [];
      if (sgr.fg !== null) cls.push("a-fg" + sgr.fg);
      if (sgr.bg !== null) cls.push("a-bg" + sgr.bg);
      if (sgr.bold) cls.push("a-bold");
      span.className = cls.join(" ");
      span.textContent = s;
      frag.appendChild(span);
    };
    while ((m = re.exec(text)) !== null) {
      emit(text.slice(last, m.index));
      if (m[2] === "m") applySgr(m[1]);
      last = re.lastIndex;
    }
    emit(text.slice(last).replace(/\x1b/g, ""));
    pre.appendChild(frag);
  }

  function note(text, cls, id) {
    const div = document.createElement("div");
    div.className = cls;
    if (id) div.id = id;
    div.textContent = text;
    pre.appendChild(div);
    return div;
  }

  // (Re)starts the stream at byte `from` (negative: before the end).
  function start(from, mark) {
    if (es) es.close();
    pre.textContent = "";
    sgr = { fg: null, bg: null, bold: false };
    status.textContent = "loading…";
    es = new EventSource("/builds/" + id + "/log/events?from=" + from);
    es.addEventListener("start", (e) => {
      const at = Number(e.data);
      if (at > 0) {
        const div = note(at + " earlier bytes not shown (search covers them). ", "log-note");
        const b = document.createElement("button");
        b.type = "button";
        b.className = "link";
        b.textContent = "Show from the start";
        b.addEventListener("click", () => start(0));
        div.appendChild(b);
      }
      if (mark) {
        const m = note(mark.text, "log-mark", mark.id);
        m.scrollIntoView();
      }
      status.textContent = "following the log";
    });
    es.addEventListener("log", (e) => {
      append(JSON.parse(e.data));
      if (follow && follow.checked && !mark) pre.scrollTop = pre.scrollHeight;
    });
    es.addEventListener("end", () => {
      status.textContent = "the build has ended; this is all of its log";
      es.close();
      es = null;
      // The badge in the heading shows how it ended.
      fetch("/api/v1/builds/" + id).then((r) => r.json()).then((b) => {
        const badge = document.querySelector("h1 .state");
        const st = b.state;
        if (badge && typeof st === "string") {
          badge.className = "state " + st;
          badge.textContent = st;
        }
      }).catch(() => {});
    });
    // A dropped connection: start over from the tail (EventSource would
    // reconnect to the same URL and append the tail a second time).
    es.onerror = () => {
      if (!es) return;
      es.close();
      es = null;
      status.textContent = "the connection dropped; reconnecting…";
      setTimeout(() => start(-tail), 2000);
    };
  }

  async function query(params) {
    const r = await fetch("/builds/" + id + "/log/search?" + new URLSearchParams(params));
    if (!r.ok) throw new Error("search failed: HTTP " + r.status);
    return r.json();
  }

  async function firstError() {
    status.textContent = "looking for the first error…";
    const hits = await query({ kind: "first-error" });
    if (hits.length === 0) {
      status.textContent = "no line looks like an error";
      return;
    }
    const h = hits[0];
    start(h.offset, { text: "▶ first error, line " + h.line, id: "first-error" });
  }

  document.getElementById("log-first-error").addEventListener("click", () => {
    history.replaceState(null, "", "#first-error");
    firstError();
  });

  document.getElementById("log-search").addEventListener("submit", async (e) => {
    e.preventDefault();
    const q = document.getElementById("log-q").value;
    hitsBox.textContent = "";
    hitsBox.hidden = false;
    if (!q) { hitsBox.hidden = true; return; }
    const hits = await query({ q });
    const head = document.createElement("p");
    head.textContent = hits.length === 0 ? "No line contains “" + q + "”." :
      hits.length + " line(s) contain “" + q + "”" + (hits.length >= 500 ? " (first 500)" : "") + ":";
    hitsBox.appendChild(head);
    const ul = document.createElement("ul");
    for (const h of hits) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "link";
      b.textContent = "line " + h.line;
      b.addEventListener("click", () => start(h.offset, { text: "▶ line " + h.line, id: "hit" }));
      const code = document.createElement("code");
      code.textContent = " " + h.text;
      li.appendChild(b);
      li.appendChild(code);
      ul.appendChild(li);
    }
    hitsBox.appendChild(ul);
  });

  if (location.hash === "#first-error") firstError();
  else start(-tail);
})();
