// Building the page from data: every text goes through textContent, never
// through HTML parsing, so nothing a message holds can become markup here.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

export function size(octets) {
  if (octets === null || octets === undefined) return "";
  if (octets < 1024) return `${octets} B`;
  if (octets < 1024 * 1024) return `${(octets / 1024).toFixed(1)} KiB`;
  return `${(octets / 1024 / 1024).toFixed(1)} MiB`;
}

// A time as a person reads it: today's as hours and minutes, older ones with the date.
export function when(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso || "";
  const now = new Date();
  const sameDay = date.toDateString() === now.toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : date.toLocaleString([], { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

// A check result's colour class: pass green, fail red, softfail/neutral amber,
// none/skipped grey, temperror/permerror purple.
export function resultClass(result) {
  const value = String(result || "none").toLowerCase();
  if (value === "pass") return "r-pass";
  if (value === "fail") return "r-fail";
  if (value === "softfail" || value === "neutral") return "r-warn";
  if (value === "temperror" || value === "permerror" || value === "error") return "r-error";
  return "r-none";
}

export function chip(text, cls, title) {
  return el("span", { class: `chip ${cls || ""}`.trim(), title: title || null, text });
}

// A padlock (drawn, so that it needs no emoji font).
export function lockIcon(title) {
  const icon = svg("svg", { viewBox: "0 0 12 14", width: 10, height: 12, class: "lock-icon", role: "img", "aria-label": title || "TLS" },
    svg("path", { d: "M3 6V4a3 3 0 0 1 6 0v2", fill: "none", "stroke-width": 1.6 }),
    svg("rect", { x: 1, y: 6, width: 10, height: 7.5, rx: 1.5 }));
  if (title) icon.prepend(svg("title", { text: title }));
  return icon;
}
