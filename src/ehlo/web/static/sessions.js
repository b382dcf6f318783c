// The sessions view (#/sessions): the server's recent SMTP sessions, with a
// message or without (refused ones too), each opening to its SMTP details.

import { getJSON } from "./api.js";
import { chip, el, lockIcon, when } from "./dom.js";
import { renderSmtp } from "./smtp.js";

const PAGE = 50;

function verdictChip(verdict) {
  const action = verdict && verdict.action ? String(verdict.action) : null;
  if (!action) return chip("—", "r-none");
  return chip(action, action === "accept" ? "r-pass" : action === "defer" ? "r-warn" : "r-fail", verdict.reply || null);
}

// A session as the SMTP tab shows a message's: the same facts under the same names.
function asMessage(session) {
  return {
    greeting: session.greeting || "",
    greeting_name: session.greeting_name || "",
    client_ip: session.client_ip,
    client_port: session.client_port,
    greeting_verdict: session.greeting_verdict,
    greeting_checks: session.greeting_checks,
    tls: session.tls,
    auth: session.auth ? (typeof session.auth === "string" ? { user: session.auth } : session.auth) : null,
    transcript: session.transcript,
  };
}

export function sessionsView(pane, isShown) {
  const state = { sessions: [], next: null, open: null };
  const body = el("tbody");
  const more = el("button", { type: "button", class: "more", id: "sessions-more", text: "Load more", hidden: true });
  const detail = el("div", { class: "session-detail", id: "session-detail" });
  const error = el("p", { class: "error", hidden: true });

  function row(session) {
    const verb = String(session.greeting || "").toUpperCase();
    const messages = Array.isArray(session.messages) ? session.messages : [];
    const open = () => {
      state.open = session.id;
      draw();
      detail.replaceChildren(
        el("h3", {}, `Session ${session.id} `, el("span", { class: "muted", text: `${when(session.started_at)} – ${when(session.ended_at)}` })),
        messages.length
          ? el("p", {}, "Messages: ", messages.map((id, i) => [i ? ", " : "", el("a", { href: `#/messages/${encodeURIComponent(id)}/smtp`, text: id })]))
          : el("p", { class: "muted", text: "No message was stored in this session." }),
        renderSmtp(asMessage(session)));
      detail.scrollIntoView({ block: "nearest" });
    };
    return el("tr", {
      class: `session${state.open === session.id ? " selected" : ""}`,
      "data-id": session.id,
      tabindex: "0",
      onclick: open,
      onkeydown: (event) => {
        if (event.key === "Enter") open();
      },
    },
    el("td", {}, el("time", { datetime: session.started_at, text: when(session.started_at) })),
    el("td", {}, el("code", { text: session.client_ip || "" })),
    el("td", {},
      verb ? el("span", { class: `badge greeting-${verb === "HELO" ? "helo" : "ehlo"}`, text: verb }) : el("span", { class: "muted", text: "no greeting" }),
      " ", el("code", { text: session.greeting_name || "" }),
      session.tls ? [" ", lockIcon(`TLS ${session.tls.version || ""}`.trim())] : null),
    el("td", { class: "num", text: String(messages.length) }),
    el("td", {}, verdictChip(session.greeting_verdict)),
    el("td", { class: "outcome" }, el("code", { text: session.outcome || "" })));
  }

  function draw() {
    body.replaceChildren(...state.sessions.map(row));
    more.hidden = !state.next;
  }

  async function load(append) {
    try {
      const data = await getJSON("/sessions", { limit: PAGE, before: append ? state.next : null });
      if (!isShown()) return;
      error.hidden = true;
      const fresh = data.sessions || [];
      state.sessions = append ? state.sessions.concat(fresh) : fresh;
      if (!append || state.next !== null) state.next = data.next || null;
      draw();
    } catch (failure) {
      error.textContent = `Cannot list the sessions: ${failure.message}`;
      error.hidden = false;
    }
  }

  more.addEventListener("click", () => load(true));
  pane.replaceChildren(
    el("div", { class: "overview-head" }, el("h2", { text: "Sessions" }),
      el("button", { type: "button", id: "sessions-refresh", text: "Refresh", onclick: () => load(false) }),
      el("span", { class: "muted", text: "every SMTP session, with or without a message, newest first" })),
    error,
    el("table", { class: "sessions", "aria-label": "SMTP sessions" },
      el("thead", {}, el("tr", {}, ["Started", "Client", "Greeting", "Messages", "Verdict", "Outcome"].map((text) => el("th", { text })))),
      body),
    more,
    detail);
  load(false);
  return { refresh: () => load(false) };
}
