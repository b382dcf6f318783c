// The ehlo web page: the message list (live), the message view with its
// tabs, the overview; hash routes (#/, #/messages/ID[/TAB], #/overview) so
// that back and forward work, and keys for everything.

import { ApiError, API, getJSON, getText, messageURL, remove } from "./api.js";
import { renderOverview } from "./charts.js";
import { chip, clear, el, lockIcon, size, when } from "./dom.js";
import { sessionsView } from "./sessions.js";
import { renderSmtp } from "./smtp.js";

const PAGE = 50;
const POLL_MS = 3000; // the list's refresh while live events are not connected
const RETRY_MS = 10000; // a new EventSource after the last one closed
const READ_KEY = "ehlo.read";
const READ_MAX = 10000;
const TABS = [
  ["html", "HTML"],
  ["text", "Text"],
  ["headers", "Headers"],
  ["raw", "Raw"],
  ["attachments", "Attachments"],
  ["smtp", "SMTP"],
];
const RAW_SHOWN = 2 * 1024 * 1024; // characters of the source shown (all of it downloads)

const $ = (id) => document.getElementById(id);

const state = {
  items: [],
  next: null,
  total: 0,
  q: "",
  selected: null, // id of the highlighted list item
  chosen: false, // whether the reader moved the highlight (else it follows the newest)
  open: null, // the message shown: its JSON
  tab: null,
  live: false,
  read: loadRead(),
  token: 0, // the latest message asked for (a slower answer to an older request is dropped)
  listToken: 0,
};

// --- read / unread, kept in localStorage ------------------------------------------

function loadRead() {
  try {
    const ids = JSON.parse(localStorage.getItem(READ_KEY) || "[]");
    return new Set(Array.isArray(ids) ? ids.map(String) : []);
  } catch (_) {
    return new Set();
  }
}

function saveRead() {
  let ids = [...state.read];
  if (ids.length > READ_MAX) ids = ids.slice(ids.length - READ_MAX);
  state.read = new Set(ids);
  try {
    localStorage.setItem(READ_KEY, JSON.stringify(ids));
  } catch (_) {
    // storage full or refused: read marks last for this page only
  }
}

function markRead(id) {
  if (state.read.has(id)) return;
  state.read.add(id);
  saveRead();
  const node = itemNode(id);
  if (node) node.classList.remove("unread");
  renderCounts();
}

function forget(ids) {
  let changed = false;
  for (const id of ids) changed = state.read.delete(id) || changed;
  if (changed) saveRead();
}

function unreadCount() {
  // Read marks of messages that are gone are dropped as deletions are seen;
  // when the whole store is listed, only the listed ones count.
  if (!state.q && state.next === null && state.items.length === state.total) {
    return state.items.filter((item) => !state.read.has(item.id)).length;
  }
  return Math.max(0, state.total - state.read.size);
}

function renderCounts() {
  const unread = unreadCount();
  $("counts").textContent = `${state.total} message${state.total === 1 ? "" : "s"}, ${unread} unread`;
  document.title = unread ? `(${unread}) ehlo` : "ehlo";
}

// --- the list ------------------------------------------------------------------------

function itemNode(id) {
  return document.querySelector(`#messages [data-id="${CSS.escape(id)}"]`);
}

function verdictOf(item) {
  const verdict = item.greeting_verdict;
  const action = verdict && verdict.action ? String(verdict.action) : null;
  if (!action) return ["v-none", "no greeting verdict"];
  const cls = action === "accept" ? "v-accept" : action === "defer" ? "v-defer" : "v-reject";
  return [cls, `greeting verdict: ${action}${verdict.check ? ` (${verdict.check})` : ""}`];
}

function renderItem(item) {
  const verb = String(item.greeting || "").toUpperCase();
  const [verdictClass, verdictTitle] = verdictOf(item);
  const classes = ["item", verdictClass];
  if (!state.read.has(item.id)) classes.push("unread");
  if (item.id === state.selected) classes.push("selected");
  if (state.open && item.id === state.open.id) classes.push("current");
  const rcpts = Array.isArray(item.rcpt_to) ? item.rcpt_to : [];
  return el("li", {
    class: classes.join(" "),
    role: "option",
    id: `m-${item.id}`,
    "data-id": item.id,
    "aria-selected": item.id === state.selected ? "true" : "false",
    onclick: () => go(`#/messages/${encodeURIComponent(item.id)}`),
  },
  el("div", { class: "row1" },
    el("span", { class: "from", text: item.mail_from || "<>", title: item.mail_from || "null reverse-path" }),
    el("time", { datetime: item.received_at, text: when(item.received_at) })),
  el("div", { class: "subject", text: item.subject || "(no subject)" }),
  el("div", { class: "row3" },
    el("span", { class: `badge greeting-${verb === "HELO" ? "helo" : "ehlo"}`, text: verb || "?", title: `${verb} ${item.greeting_name || ""}` }),
    item.tls ? lockIcon(`TLS ${item.tls.version || ""} ${item.tls.cipher || ""}`.trim()) : null,
    el("span", { class: "verdict", title: verdictTitle, "aria-label": verdictTitle }),
    el("span", { class: "to", text: rcpts.length ? `to ${rcpts.join(", ")}` : "" }),
    el("span", { class: "size", text: size(item.size) })));
}

function renderList() {
  const list = $("messages");
  list.replaceChildren(...state.items.map(renderItem));
  if (state.selected) list.setAttribute("aria-activedescendant", `m-${state.selected}`);
  else list.removeAttribute("aria-activedescendant");
  $("empty").hidden = state.items.length > 0;
  $("more").hidden = !state.next;
  $("delete-all").textContent = state.q ? "Delete matching" : "Delete all";
  renderCounts();
}

function showSearchError(message) {
  const node = $("search-error");
  node.textContent = message || "";
  node.hidden = !message;
}

async function loadList() {
  const token = ++state.listToken;
  try {
    const data = await getJSON("/messages", { q: state.q, limit: PAGE });
    if (token !== state.listToken) return;
    showSearchError(null);
    state.items = data.messages || [];
    state.next = data.next || null;
    state.total = data.total ?? state.items.length;
    if (!state.chosen || !state.items.some((item) => item.id === state.selected)) {
      state.selected = state.items[0] ? state.items[0].id : null;
    }
    renderList();
  } catch (error) {
    if (token !== state.listToken) return;
    showSearchError(error instanceof ApiError && error.status === 400 ? error.message : `Cannot list messages: ${error.message}`);
    state.items = [];
    state.next = null;
    renderList();
  }
}

async function loadMore() {
  if (!state.next) return;
  const token = state.listToken;
  const data = await getJSON("/messages", { q: state.q, limit: PAGE, before: state.next });
  if (token !== state.listToken) return;
  const known = new Set(state.items.map((item) => item.id));
  state.items.push(...(data.messages || []).filter((item) => !known.has(item.id)));
  state.next = data.next || null;
  state.total = data.total ?? state.total;
  renderList();
}

// The first page again, merged into what is listed: new ones on top, gone
// ones dropped, the older pages already loaded kept.
async function refreshTop() {
  const token = state.listToken;
  let data;
  try {
    data = await getJSON("/messages", { q: state.q, limit: PAGE });
  } catch (_) {
    return;
  }
  if (token !== state.listToken) return;
  const fresh = data.messages || [];
  const last = fresh.length ? fresh[fresh.length - 1].id : null;
  const at = last === null ? -1 : state.items.findIndex((item) => item.id === last);
  if (at >= 0) {
    state.items = fresh.concat(state.items.slice(at + 1));
  } else {
    state.items = fresh;
    state.next = data.next || null;
  }
  state.total = data.total ?? state.total;
  if (!state.items.some((item) => item.id === state.selected)) state.selected = state.items[0] ? state.items[0].id : null;
  renderList();
}

let refreshTimer = null;
function refreshSoon(delay = 250) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshTop, delay);
}

// --- live: Server-Sent Events, polling while they are not connected --------------------

let pollTimer = null;

function setLive(live) {
  state.live = live;
  const node = $("live");
  node.textContent = live ? "● live" : "○ polling";
  node.className = live ? "live on" : "live off";
  node.title = live ? "New messages appear as they arrive" : "Live events unavailable: the list is refreshed every few seconds";
  if (live) {
    clearInterval(pollTimer);
    pollTimer = null;
  } else if (pollTimer === null) {
    pollTimer = setInterval(() => {
      refreshTop();
      if (currentRoute().name === "overview") loadOverview();
      sessionsSoon();
    }, POLL_MS);
  }
}

function onNew(item) {
  if (!item || !item.id) return;
  overviewSoon();
  sessionsSoon();
  if (state.items.some((known) => known.id === item.id)) return;
  if (state.q) {
    refreshSoon(); // only the server knows whether it matches the search
    return;
  }
  state.items.unshift(item);
  state.total += 1;
  if (!state.selected || !state.chosen) state.selected = item.id;
  renderList();
}

function onDeleted(ids) {
  if (!Array.isArray(ids)) return;
  const gone = new Set(ids.map(String));
  state.items = state.items.filter((item) => !gone.has(item.id));
  forget(gone);
  refreshSoon(); // the store's count (this page may have counted its own deletes already)
  if (state.selected && gone.has(state.selected)) state.selected = state.items[0] ? state.items[0].id : null;
  renderList();
  overviewSoon();
  if (state.open && gone.has(state.open.id)) showGone(state.open.id);
}

function connectLive() {
  if (!("EventSource" in window)) {
    setLive(false);
    return;
  }
  const source = new EventSource(`${API}/events`);
  source.addEventListener("open", () => {
    setLive(true);
    refreshSoon(0); // what arrived while not connected
  });
  source.addEventListener("error", () => {
    setLive(false);
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connectLive, RETRY_MS);
    }
  });
  source.addEventListener("message.new", (event) => {
    try {
      onNew(JSON.parse(event.data));
    } catch (_) {
      refreshSoon();
    }
  });
  source.addEventListener("message.deleted", (event) => {
    try {
      onDeleted(JSON.parse(event.data).ids);
    } catch (_) {
      refreshSoon();
    }
  });
}

// --- deleting, with a confirm step -------------------------------------------------------

function confirmDialog(text, focusOk) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
    (focusOk ? $("confirm-ok") : $("confirm-cancel")).focus();
  });
}

async function deleteOne(id) {
  const item = state.items.find((known) => known.id === id) || (state.open && state.open.id === id ? state.open : null);
  const what = item && item.subject ? `“${item.subject}”` : `message ${id}`;
  if (!(await confirmDialog(`Delete ${what}?`, true))) return;
  const index = state.items.findIndex((known) => known.id === id);
  try {
    await remove(`/messages/${encodeURIComponent(id)}`);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) {
      alertError(`Cannot delete: ${error.message}`);
      return;
    }
  }
  const wasOpen = state.open && state.open.id === id;
  if (state.items.some((known) => known.id === id)) {
    state.items = state.items.filter((known) => known.id !== id);
    state.total = Math.max(0, state.total - 1);
  }
  forget([id]);
  const neighbour = state.items[Math.min(index, state.items.length - 1)];
  state.selected = neighbour ? neighbour.id : null;
  renderList();
  if (wasOpen) go(neighbour ? `#/messages/${encodeURIComponent(neighbour.id)}` : "#/");
}

async function deleteAll() {
  const text = state.q ? `Delete every message matching “${state.q}”?` : `Delete all ${state.total} messages?`;
  if (!(await confirmDialog(text, false))) return;
  try {
    await remove("/messages", state.q ? { q: state.q } : {});
  } catch (error) {
    alertError(`Cannot delete: ${error.message}`);
    return;
  }
  if (!state.q) {
    state.read.clear();
    saveRead();
  }
  go("#/");
  await loadList();
}

function alertError(text) {
  showSearchError(text);
}

// --- the message view --------------------------------------------------------------------

function field(label, value) {
  return el("div", { class: "field" }, el("dt", { text: label }), el("dd", {}, value));
}

function showGone(id) {
  const view = $("view");
  view.hidden = false;
  $("placeholder").hidden = true;
  view.replaceChildren(el("p", { class: "error", text: `Message ${id} is not in the store (deleted?).` }),
    el("a", { href: "#/", class: "back", text: "← Back to the list" }));
}

async function openMessage(id, tab) {
  if (state.open && state.open.id === id) {
    showTab(tab || state.tab);
    return;
  }
  const token = ++state.token;
  let message;
  try {
    message = await getJSON(`/messages/${encodeURIComponent(id)}`);
  } catch (error) {
    if (token !== state.token) return;
    state.open = null;
    if (error instanceof ApiError && error.status === 404) showGone(id);
    else showGone(`${id}: ${error.message}`);
    return;
  }
  if (token !== state.token) return;
  state.open = message;
  state.selected = id;
  state.chosen = true;
  markRead(id);
  renderList();
  renderMessage(message);
  const chosen = tab || (state.tab && state.tab !== "html" ? state.tab : null) || (message.has_html ? "html" : "text");
  showTab(chosen);
  const node = itemNode(id);
  if (node) node.scrollIntoView({ block: "nearest" });
}

function renderMessage(message) {
  const view = $("view");
  $("placeholder").hidden = true;
  view.hidden = false;
  const rcpts = Array.isArray(message.rcpt_to) ? message.rcpt_to.join(", ") : "";
  const tablist = el("div", { class: "tabs", role: "tablist", "aria-label": "Message views" });
  for (const [name, label] of TABS) {
    let text = label;
    if (name === "attachments" && Array.isArray(message.parts)) {
      const count = message.parts.filter(isAttachment).length;
      if (count) text = `${label} (${count})`;
    }
    tablist.append(el("button", {
      type: "button", role: "tab", id: `tab-${name}`, "data-tab": name, "aria-controls": "panel",
      "aria-selected": "false", tabindex: "-1", text,
      onclick: () => go(`#/messages/${encodeURIComponent(message.id)}/${name}`, true),
    }));
  }
  tablist.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowLeft" && event.key !== "ArrowRight" && event.key !== "Home" && event.key !== "End") return;
    event.preventDefault();
    const names = TABS.map(([name]) => name);
    let at = names.indexOf(state.tab);
    if (event.key === "ArrowLeft") at = (at + names.length - 1) % names.length;
    else if (event.key === "ArrowRight") at = (at + 1) % names.length;
    else at = event.key === "Home" ? 0 : names.length - 1;
    go(`#/messages/${encodeURIComponent(message.id)}/${names[at]}`, true);
    $(`tab-${names[at]}`).focus();
  });
  view.replaceChildren(
    el("div", { class: "view-head" },
      el("a", { href: "#/", class: "back", text: "← List", title: "Back to the list (Esc)" }),
      el("h2", { class: "view-subject", text: message.subject || "(no subject)" }),
      el("button", { type: "button", class: "danger", id: "delete-one", text: "Delete", title: "Delete (d)", onclick: () => deleteOne(message.id) })),
    el("dl", { class: "fields" },
      field("From", el("code", { text: message.mail_from || "<>" })),
      field("To", el("code", { text: rcpts })),
      field("Received", el("time", { datetime: message.received_at, text: `${when(message.received_at)} from ${message.greeting_name || "?"} [${message.client_ip || ""}]` })),
      field("Size", el("span", { text: size(message.size) })),
      field("Id", el("code", { text: message.id }))),
    tablist,
    el("div", { class: "panel", id: "panel", role: "tabpanel", tabindex: "0" }),
  );
}

function isAttachment(part) {
  return part.index !== 0 && (part.disposition === "attachment" || (part.filename && !String(part.type || "").startsWith("multipart/")));
}

function showTab(tab) {
  const message = state.open;
  if (!message) return;
  if (!TABS.some(([name]) => name === tab)) tab = message.has_html ? "html" : "text";
  state.tab = tab;
  for (const [name] of TABS) {
    const button = $(`tab-${name}`);
    if (!button) continue;
    button.setAttribute("aria-selected", name === tab ? "true" : "false");
    button.tabIndex = name === tab ? 0 : -1;
  }
  const panel = $("panel");
  panel.setAttribute("aria-labelledby", `tab-${tab}`);
  panel.dataset.tab = tab;
  clear(panel);
  const id = message.id;
  const token = state.token;
  const fill = (...children) => {
    if (state.token === token && state.tab === tab) panel.replaceChildren(...children);
  };
  if (tab === "html") {
    if (message.has_html === false) {
      fill(el("p", { class: "muted", text: "This message has no HTML part." }));
      return;
    }
    const frame = el("iframe", {
      class: "html-frame",
      id: "html-frame",
      title: "The message's HTML, sanitised, without scripts",
      sandbox: "allow-popups allow-popups-to-escape-sandbox",
      referrerpolicy: "no-referrer",
      src: messageURL(id, "/html"),
    });
    const images = el("button", {
      type: "button", id: "remote-images", text: "Show remote images",
      onclick: () => {
        frame.src = messageURL(id, "/html?images=1");
        images.disabled = true;
        images.textContent = "Remote images shown";
      },
    });
    fill(el("div", { class: "html-bar" }, images, el("span", { class: "muted", text: "Remote content is blocked until you ask." })), frame);
  } else if (tab === "text") {
    getText(`/messages/${encodeURIComponent(id)}/text`).then(
      (text) => fill(el("pre", { class: "text-body", text })),
      (error) => fill(el("p", { class: "muted", text: error.status === 404 ? "This message has no text part." : error.message })));
  } else if (tab === "headers") {
    const headers = Array.isArray(message.headers) ? message.headers : [];
    fill(el("table", { class: "headers" }, el("tbody", {}, headers.map(([name, value]) =>
      el("tr", {}, el("th", { scope: "row", text: name }), el("td", { text: value }))))));
  } else if (tab === "raw") {
    getText(`/messages/${encodeURIComponent(id)}/raw`).then((text) => {
      const shown = text.length > RAW_SHOWN ? `${text.slice(0, RAW_SHOWN)}\n… (${text.length - RAW_SHOWN} more characters: download to see all)` : text;
      fill(el("div", { class: "raw-bar" }, el("a", { href: messageURL(id, "/raw?download=1"), id: "raw-download", download: `${id}.eml`, text: "Download .eml" })),
        el("pre", { class: "raw", text: shown }));
    }, (error) => fill(el("p", { class: "error", text: error.message })));
  } else if (tab === "attachments") {
    const parts = Array.isArray(message.parts) ? message.parts : [];
    if (!parts.length) {
      fill(el("p", { class: "muted", text: "No MIME parts." }));
      return;
    }
    fill(el("table", { class: "parts" },
      el("thead", {}, el("tr", {}, ["#", "Part", "Type", "Size", ""].map((text) => el("th", { text })))),
      el("tbody", {}, parts.map((part) => {
        const container = String(part.type || "").startsWith("multipart/");
        const name = part.filename || (part.index === 0 ? "(message)" : part.content_id ? `<${part.content_id}>` : "(unnamed)");
        return el("tr", { class: isAttachment(part) ? "attachment" : "" },
          el("td", { class: "num", text: String(part.index) }),
          el("td", { class: `depth-${Math.min(part.depth || 0, 6)}` }, el("span", { text: name }),
            part.disposition ? chip(part.disposition, "r-none") : null),
          el("td", {}, el("code", { text: part.type || "" })),
          el("td", { class: "num", text: size(part.size) }),
          el("td", {}, container ? "" : el("a", { href: messageURL(id, `/parts/${part.index}`), download: part.filename || "", text: "Download" })));
      }))));
  } else if (tab === "smtp") {
    fill(renderSmtp(message));
  }
}

// --- the overview ------------------------------------------------------------------------

let overviewMinutes = 60;
let overviewTimer = null;

async function loadOverview() {
  const pane = $("overview-pane");
  try {
    const data = await getJSON("/overview", { minutes: overviewMinutes });
    if (currentRoute().name !== "overview") return;
    if (!$("overview-minutes")) {
      // The heading and its window stay; only the charts are drawn again.
      const select = el("select", { id: "overview-minutes", "aria-label": "Window", onchange: (event) => {
        overviewMinutes = Number(event.target.value);
        loadOverview();
      } }, [15, 60, 360, 1440].map((minutes) => el("option", { value: minutes, selected: minutes === overviewMinutes,
        text: minutes < 60 ? `last ${minutes} minutes` : minutes === 60 ? "last hour" : `last ${minutes / 60} hours` })));
      pane.replaceChildren(el("div", { class: "overview-head" }, el("h2", { text: "Overview" }), select),
        el("div", { id: "overview-charts" }));
    }
    $("overview-charts").replaceChildren(renderOverview(data));
  } catch (error) {
    pane.replaceChildren(el("p", { class: "error", text: `Cannot load the overview: ${error.message}` }));
  }
}

let sessions = null; // the sessions view while it is shown
let sessionsTimer = null;

function sessionsSoon() {
  if (currentRoute().name !== "sessions" || !sessions) return;
  clearTimeout(sessionsTimer);
  sessionsTimer = setTimeout(sessions.refresh, 1000);
}

function overviewSoon() {
  if (currentRoute().name !== "overview") return;
  clearTimeout(overviewTimer);
  overviewTimer = setTimeout(loadOverview, 1000);
}

// --- routes ----------------------------------------------------------------------------------

function currentRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map((part) => decodeURIComponent(part));
  if (parts[0] === "overview") return { name: "overview" };
  if (parts[0] === "sessions") return { name: "sessions" };
  if (parts[0] === "messages" && parts[1]) return { name: "message", id: parts[1], tab: parts[2] || null };
  return { name: "list" };
}

// Go to a route; ``replace``: without a new history entry (tabs).
function go(hash, replace = false) {
  if (location.hash === hash) {
    route();
  } else if (replace) {
    history.replaceState(null, "", hash);
    route();
  } else {
    location.hash = hash;
  }
}

function route() {
  const current = currentRoute();
  document.body.dataset.mode = current.name;
  const elsewhere = current.name === "overview" || current.name === "sessions";
  $("nav-messages").setAttribute("aria-current", elsewhere ? "false" : "page");
  $("nav-overview").setAttribute("aria-current", current.name === "overview" ? "page" : "false");
  $("nav-sessions").setAttribute("aria-current", current.name === "sessions" ? "page" : "false");
  $("overview-pane").hidden = current.name !== "overview";
  $("sessions-pane").hidden = current.name !== "sessions";
  $("list-pane").hidden = elsewhere;
  $("view-pane").hidden = elsewhere;
  if (current.name === "overview") {
    loadOverview();
  } else if (current.name === "sessions") {
    sessions = sessionsView($("sessions-pane"), () => currentRoute().name === "sessions");
  } else if (current.name === "message") {
    openMessage(current.id, current.tab);
  } else {
    state.open = null;
    state.token++;
    $("view").hidden = true;
    $("view").replaceChildren();
    $("placeholder").hidden = false;
    renderList();
  }
}

// --- keys ------------------------------------------------------------------------------------

function listShown() {
  const name = currentRoute().name;
  return name === "list" || name === "message";
}

function move(step) {
  if (!state.items.length) return;
  let at = state.items.findIndex((item) => item.id === state.selected);
  at = at < 0 ? 0 : Math.max(0, Math.min(state.items.length - 1, at + step));
  state.selected = state.items[at].id;
  state.chosen = true;
  if (state.open) {
    go(`#/messages/${encodeURIComponent(state.selected)}`);
  } else {
    renderList();
  }
  const node = itemNode(state.selected);
  if (node) node.scrollIntoView({ block: "nearest" });
}

function onKey(event) {
  if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
  if ($("confirm").open) return;
  const target = event.target;
  const typing = target instanceof HTMLElement && target.matches("input, textarea, select");
  if (event.key === "Escape") {
    if (typing) {
      target.blur();
    } else if (currentRoute().name !== "list") {
      go("#/");
    }
    return;
  }
  if (typing) return;
  const onControl = target instanceof HTMLElement && target.matches("button, a, [role=tab]");
  switch (event.key) {
    case "/":
      event.preventDefault();
      $("search").focus();
      $("search").select();
      break;
    case "j":
    case "ArrowDown":
      if (!listShown()) return;
      event.preventDefault();
      move(1);
      break;
    case "k":
    case "ArrowUp":
      if (!listShown()) return;
      event.preventDefault();
      move(-1);
      break;
    case "Enter":
      if (onControl || !state.selected || !listShown()) return;
      event.preventDefault();
      go(`#/messages/${encodeURIComponent(state.selected)}`);
      break;
    case "d":
    case "Delete": {
      const id = state.open ? state.open.id : state.selected;
      if (!id || !listShown()) return;
      event.preventDefault();
      deleteOne(id);
      break;
    }
    default:
  }
}

// --- start -------------------------------------------------------------------------------------

function start() {
  let searchTimer = null;
  const search = $("search");
  const apply = () => {
    clearTimeout(searchTimer);
    if (search.value.trim() === state.q) return;
    state.q = search.value.trim();
    loadList();
  };
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(apply, 300);
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apply();
  });
  $("more").addEventListener("click", () => loadMore().catch((error) => alertError(error.message)));
  $("delete-all").addEventListener("click", deleteAll);
  document.addEventListener("keydown", onKey);
  window.addEventListener("hashchange", route);
  setLive(false);
  loadList().then(route);
  connectLive();
}

start();
