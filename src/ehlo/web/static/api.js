// The JSON API under /api/v1: every request of the page goes through here.

export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function check(response) {
  if (response.ok) return response;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    // not the JSON error shape: keep the status line
  }
  throw new ApiError(response.status, message);
}

export async function getJSON(path, params = {}) {
  const url = new URL(API + path, location.origin);
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, value);
  }
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  return (await check(response)).json();
}

export async function getText(path) {
  const response = await fetch(API + path);
  return (await check(response)).text();
}

export async function remove(path, params = {}) {
  const url = new URL(API + path, location.origin);
  for (const [key, value] of Object.entries(params)) {
    if (value) url.searchParams.set(key, value);
  }
  const response = await fetch(url, { method: "DELETE", headers: { Accept: "application/json" } });
  return (await check(response)).json();
}

export function messageURL(id, suffix = "") {
  return `${API}/messages/${encodeURIComponent(id)}${suffix}`;
}
