// The overview: charts drawn as SVG by hand from GET /api/v1/overview.

import { chip, el, resultClass, svg } from "./dom.js";

const RESULT_ORDER = ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"];

function barChart(perMinute) {
  // Bars in a stretched SVG (its height fixed by the stylesheet); the labels
  // are text around it, so that they keep their size at any width.
  const max = Math.max(1, ...perMinute.map(([, count]) => count));
  const n = Math.max(1, perMinute.length);
  const chart = svg("svg", { viewBox: `0 0 ${n} 100`, preserveAspectRatio: "none", class: "chart bars", role: "img",
    "aria-label": `Messages per minute, at most ${max}` });
  const label = (iso) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  perMinute.forEach(([minute, count], i) => {
    const h = (count / max) * 100;
    const bar = svg("rect", { x: i + 0.1, y: 100 - h, width: 0.8, height: h, class: "bar" });
    bar.append(svg("title", { text: `${label(minute)}: ${count}` }));
    chart.append(bar);
  });
  return el("div", { class: "bars-chart" },
    el("div", { class: "axis", text: `${max} per minute at most` }),
    chart,
    perMinute.length
      ? el("div", { class: "axis ends" }, el("span", { text: label(perMinute[0][0]) }),
        el("span", { text: label(perMinute[perMinute.length - 1][0]) }))
      : null);
}

// One horizontal bar split into shares, with a legend.
function shareBar(label, shares) {
  const total = shares.reduce((sum, s) => sum + s.count, 0);
  const bar = svg("svg", { viewBox: "0 0 100 8", preserveAspectRatio: "none", class: "chart share", role: "img",
    "aria-label": `${label}: ${shares.map((s) => `${s.name} ${s.count}`).join(", ")}` });
  let x = 0;
  for (const share of shares) {
    if (!share.count) continue;
    const w = (share.count / total) * 100;
    const rect = svg("rect", { x, y: 0, width: w, height: 8, class: share.cls });
    rect.append(svg("title", { text: `${share.name}: ${share.count}` }));
    bar.append(rect);
    x += w;
  }
  if (!total) bar.append(svg("rect", { x: 0, y: 0, width: 100, height: 8, class: "r-none" }));
  const legend = el("div", { class: "legend" }, shares.map((s) =>
    chip(`${s.name} ${s.count}${total ? ` (${Math.round((s.count / total) * 100)}%)` : ""}`, s.cls)));
  return el("div", { class: "share-row" }, el("div", { class: "share-label", text: label }), bar, legend);
}

function checkShares(results) {
  const names = Object.keys(results).sort((a, b) => {
    const ia = RESULT_ORDER.indexOf(a);
    const ib = RESULT_ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
  return names.map((name) => ({ name, count: results[name], cls: resultClass(name) }));
}

function topNames(rows) {
  if (!rows.length) return el("p", { class: "muted", text: "No messages in this window." });
  const max = Math.max(...rows.map(([, n]) => n));
  return el("table", { class: "top-names" }, el("tbody", {}, rows.map(([name, count]) => {
    const bar = svg("svg", { viewBox: "0 0 100 6", preserveAspectRatio: "none", class: "chart mini" },
      svg("rect", { x: 0, y: 0, width: (count / max) * 100, height: 6, class: "bar" }));
    return el("tr", {}, el("td", {}, el("code", { text: name || "(empty)" })), el("td", { class: "num", text: String(count) }),
      el("td", { class: "mini-cell" }, bar));
  })));
}

export function renderOverview(data) {
  const greetings = data.greetings || {};
  const tls = data.tls || {};
  const checks = Object.entries(data.checks || {});
  return el("div", { class: "overview" },
    el("section", { class: "card wide" },
      el("h3", {}, `Messages per minute `, el("span", { class: "muted", text: `(${data.total} in the last ${data.minutes || data.per_minute.length} minutes)` })),
      barChart(data.per_minute || [])),
    el("section", { class: "card" },
      el("h3", { text: "Greeting and TLS" }),
      shareBar("Greeting", [
        { name: "EHLO", count: greetings.EHLO || 0, cls: "s-ehlo" },
        { name: "HELO", count: greetings.HELO || 0, cls: "s-helo" },
      ]),
      shareBar("TLS", [
        { name: "TLS", count: tls.yes || 0, cls: "r-pass" },
        { name: "plain", count: tls.no || 0, cls: "r-none" },
      ])),
    el("section", { class: "card" },
      el("h3", { text: "Top client names" }),
      topNames(data.top_names || [])),
    el("section", { class: "card wide checks-card" },
      el("h3", { text: "Greeting checks" }),
      checks.length
        ? checks.map(([name, results]) => shareBar(name, checkShares(results)))
        : el("p", { class: "muted", text: "No greeting checks in this window." })),
  );
}
