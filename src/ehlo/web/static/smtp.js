// The SMTP tab: the greeting as the client gave it, what the server offered,
// TLS and AUTH, the greeting checks with the DNS answers behind them, and the
// transcript of the session, line by line.

import { chip, el, lockIcon, resultClass } from "./dom.js";

const GREETING = /^(HELO|EHLO)\s+(\S.*)?$/i;

// The EHLO reply's extensions: the lines of the 250 answering the (last) EHLO,
// without its first line (the server's name and greeting).
export function extensions(transcript) {
  let found = [];
  for (let i = 0; i < transcript.length; i++) {
    const line = transcript[i];
    if (line.dir !== "C" || !/^EHLO\b/i.test(line.text)) continue;
    const reply = [];
    for (let j = i + 1; j < transcript.length && transcript[j].dir !== "C"; j++) {
      if (transcript[j].dir === "S") reply.push(transcript[j].text);
    }
    if (reply.length && reply[0].startsWith("250")) {
      found = reply.slice(1).map((text) => text.slice(4)).filter(Boolean);
    }
  }
  return found;
}

function factRow(label, ...value) {
  return el("div", { class: "fact" }, el("dt", { text: label }), el("dd", {}, ...value));
}

function verdictChip(verdict) {
  if (!verdict) return chip("no verdict", "r-none");
  const action = String(verdict.action || "accept");
  const cls = action === "accept" ? "r-pass" : action === "defer" ? "r-warn" : "r-fail";
  const text = verdict.check ? `${action} (${verdict.check})` : action;
  return chip(text, cls, verdict.reply || null);
}

function lookupLine(lookup) {
  const head = `${lookup.name || ""} ${lookup.type || ""}`.trim();
  let answer;
  if (lookup.error) answer = `error: ${lookup.error}`;
  else if (lookup.nxdomain) answer = "NXDOMAIN";
  else if (Array.isArray(lookup.answers)) answer = lookup.answers.length ? lookup.answers.join(", ") : "(no records)";
  else if (Array.isArray(lookup.addresses)) answer = (lookup.addresses.join(", ") || "(no addresses)") + (lookup.confirmed ? " (confirmed)" : "");
  else answer = JSON.stringify(lookup);
  const via = Array.isArray(lookup.cnames) && lookup.cnames.length ? ` via ${lookup.cnames.join(" → ")}` : "";
  return el("li", { class: "lookup" }, el("code", { text: head }), " → ", el("code", { text: answer + via }));
}

function evidenceList(evidence) {
  const list = el("ul", { class: "evidence" });
  if (!evidence || typeof evidence !== "object") return list;
  for (const [key, value] of Object.entries(evidence)) {
    if (Array.isArray(value) && value.length && typeof value[0] === "object" && value[0] !== null) {
      for (const item of value) list.append(lookupLine(item));
    } else if (Array.isArray(value)) {
      list.append(el("li", {}, el("span", { class: "key", text: `${key}: ` }), el("code", { text: value.join(", ") || "(none)" })));
    } else if (value !== null && typeof value === "object") {
      list.append(el("li", {}, el("span", { class: "key", text: `${key}: ` }), el("code", { text: JSON.stringify(value) })));
    } else if (value !== null && value !== undefined && value !== "") {
      list.append(el("li", {}, el("span", { class: "key", text: `${key}: ` }), el("code", { text: String(value) })));
    }
  }
  return list;
}

export function checksTable(checks) {
  const entries = Object.entries(checks || {});
  if (!entries.length) return el("p", { class: "muted", text: "No greeting checks were run." });
  const body = el("tbody");
  for (const [name, entry] of entries) {
    const result = (entry && entry.result) || "none";
    body.append(
      el("tr", { "data-check": name },
        el("th", { scope: "row" }, el("code", { text: name })),
        el("td", {}, chip(result, resultClass(result))),
        el("td", {}, el("div", { class: "reason", text: (entry && entry.reason) || "" }), evidenceList(entry && entry.evidence)),
      ),
    );
  }
  return el("table", { class: "checks" },
    el("thead", {}, el("tr", {}, el("th", { text: "Check" }), el("th", { text: "Result" }), el("th", { text: "Reason and DNS answers" }))),
    body);
}

export function transcriptTable(transcript) {
  const body = el("tbody");
  for (const line of transcript) {
    const dir = line.dir === "C" || line.dir === "S" ? line.dir : "*";
    let cls = dir === "C" ? "t-c" : dir === "S" ? "t-s" : "t-e";
    if (dir === "C" && GREETING.test(line.text)) cls += " t-greeting";
    if (dir === "*" && /^TLS/i.test(line.text)) cls += " t-tls";
    if (dir === "S" && /^[45]\d\d/.test(line.text)) cls += " t-refused";
    const t = typeof line.t === "number" ? line.t.toFixed(3) : "";
    body.append(el("tr", { class: cls },
      el("td", { class: "t-time", text: t }),
      el("td", { class: "t-dir", text: dir }),
      el("td", { class: "t-text" }, el("code", { text: line.text }))));
  }
  return el("table", { class: "transcript", "aria-label": "SMTP transcript" },
    el("thead", {}, el("tr", {}, el("th", { text: "s" }), el("th", { text: "" }), el("th", { text: "line" }))),
    body);
}

export function renderSmtp(message) {
  const transcript = Array.isArray(message.transcript) ? message.transcript : null;
  const verb = String(message.greeting || "").toUpperCase();
  const offered = transcript ? extensions(transcript) : [];
  const tls = message.tls;
  const auth = message.auth;
  const facts = el("dl", { class: "facts" },
    factRow("Greeting",
      el("span", { class: `badge greeting-${verb === "HELO" ? "helo" : "ehlo"}`, text: verb || "?" }),
      " ",
      el("strong", { class: "greeting-name", text: message.greeting_name || "" })),
    factRow("Client", el("code", { text: `${message.client_ip || ""}${message.client_port ? ` port ${message.client_port}` : ""}` })),
    factRow("Verdict", verdictChip(message.greeting_verdict)),
    factRow("TLS", tls
      ? el("span", { class: "tls-on" }, lockIcon("TLS"), " ", el("code", { text: [tls.version, tls.cipher].filter(Boolean).join(" ") }))
      : el("span", { class: "muted", text: "none (plain text)" })),
    factRow("AUTH", auth && auth.user
      ? el("span", {}, auth.mechanism ? [el("code", { text: auth.mechanism }), " as "] : null, el("strong", { text: auth.user }))
      : el("span", { class: "muted", text: "none" })),
  );
  if (offered.length) {
    facts.append(factRow("Extensions", el("span", { class: "chips" }, offered.map((name) => chip(name, "ext")))));
  }
  const parts = [
    el("h3", { text: "Session" }),
    facts,
    el("h3", { text: "Greeting verification" }),
    checksTable(message.greeting_checks),
    el("h3", { text: "Transcript" }),
  ];
  parts.push(transcript && transcript.length
    ? transcriptTable(transcript)
    : el("p", { class: "muted", text: "No transcript was recorded." }));
  return el("div", { class: "smtp" }, parts);
}
