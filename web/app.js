// segue's web client: one page over the client API (docs/api.md).
// Message text only ever reaches the page through textContent and
// createElement: markup in a message shows as text. No innerHTML anywhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  token: localStorage.getItem("segue.token") || "",
  rooms: new Map(),      // "backend/room_id" -> {backend, id, name, unread, el}
  open: null,            // the open room's key
  oldest: null,          // the id of the oldest message shown
  loadingOlder: false,
  exhausted: false,
  source: null,          // the EventSource
};

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  opts.headers.Authorization = "Bearer " + state.token;
  const r = await fetch(path, opts);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) {
    const err = new Error((body && body.error) || r.statusText);
    err.status = r.status;
    throw err;
  }
  return body;
}

const seg = encodeURIComponent;
const roomKey = (backend, id) => backend + "/" + id;
const messagesPath = (room) => "/api/v1/rooms/" + seg(room.backend) + "/" + seg(room.id) + "/messages";

// ---- MessageContent -> DOM ---------------------------------------------------

// Text with `code` spans: the backticks become <code>, the rest stays text.
function renderText(s) {
  const parts = String(s).split("`");
  const frag = document.createDocumentFragment();
  parts.forEach((p, i) => {
    if (i % 2 === 1 && i < parts.length - 1) frag.append(el("code", { text: p }));
    else frag.append(document.createTextNode((i % 2 === 1 ? "`" : "") + p));
  });
  return frag;
}

const WRAP = { Bold: "strong", Italic: "em", Underline: "u", Crossout: "s" };

function renderContent(c, depth) {
  depth = depth || 0;
  if (!c || typeof c !== "object" || depth > 64) return document.createTextNode("");
  const v = c.value;
  if (c.type === "Text") return renderText(v);
  if (WRAP[c.type]) return el(WRAP[c.type], null, renderContent(v, depth + 1));
  if (c.type === "Concat") {
    const frag = document.createDocumentFragment();
    for (const x of Array.isArray(v) ? v : []) frag.append(renderContent(x, depth + 1));
    return frag;
  }
  if (c.type === "Emote") return el("em", { text: "* " + v });
  if (c.type === "UrlLink") {
    const url = String(v);
    if (/^https?:\/\//i.test(url)) {
      return el("a", { href: url, target: "_blank", rel: "noopener noreferrer", text: url });
    }
    return document.createTextNode(url);
  }
  if (c.type === "UserLink") return el("span", { class: "user", text: "@" + v });
  if (c.type === "RoomLink") return el("span", { class: "roomlink", text: "#" + v });
  if (c.type === "MessageLink") return el("span", { class: "msglink", text: "[message " + v + "]" });
  return document.createTextNode("");
}

function renderAttachments(list) {
  const frag = document.createDocumentFragment();
  for (const a of Array.isArray(list) ? list : []) {
    if (typeof a.mime === "string" && /^image\/(png|jpeg|gif|webp)$/.test(a.mime) &&
        typeof a.data === "string" && /^[A-Za-z0-9+/=]*$/.test(a.data)) {
      frag.append(el("img", { src: "data:" + a.mime + ";base64," + a.data, alt: "image" }));
    } else if (a && a.mime) {
      frag.append(el("span", { class: "muted", text: "[" + a.mime + " attachment]" }));
    }
  }
  return frag;
}

function messageElement(m) {
  const t = new Date(m.create_time);
  return el("div", { class: "msg", "data-message-id": m.id },
    el("span", { class: "time", text: isNaN(t) ? "" : t.toLocaleTimeString() }),
    el("span", { class: "from", text: m.sender || "?" }),
    el("span", { class: "body" }, renderContent(m.content)),
    renderAttachments(m.attachments));
}

// ---- rooms ---------------------------------------------------------------------

function setUnread(room) {
  room.badge.textContent = room.unread > 0 ? String(room.unread) : "";
}

function addRoom(r) {
  const key = roomKey(r.backend, r.id);
  let room = state.rooms.get(key);
  if (room) {
    room.name = r.name || room.name;
    room.label.textContent = room.name;
    return room;
  }
  room = { backend: r.backend, id: r.id, name: r.name || r.id, unread: r.unread || 0 };
  room.label = el("span", { text: room.name });
  room.badge = el("span", { class: "unread" });
  room.el = el("a", { href: "#", "data-room": key }, room.label, room.badge);
  room.el.addEventListener("click", (ev) => { ev.preventDefault(); openRoom(key); });
  setUnread(room);
  state.rooms.set(key, room);
  let group = document.querySelector('#rooms [data-backend="' + CSS.escape(r.backend) + '"]');
  if (!group) {
    group = el("div", { "data-backend": r.backend }, el("h3", { text: r.backend }));
    $("rooms").append(group);
  }
  group.append(room.el);
  return room;
}

async function loadRooms() {
  const rooms = await api("/api/v1/rooms");
  $("rooms").replaceChildren();
  state.rooms.clear();
  for (const r of rooms) addRoom(r);
}

async function openRoom(key) {
  const room = state.rooms.get(key);
  if (!room) return;
  for (const r of state.rooms.values()) r.el.classList.toggle("open", r === room);
  state.open = key;
  state.oldest = null;
  state.exhausted = false;
  $("status").hidden = true;
  $("room").hidden = false;
  $("room-title").textContent = room.backend + " / " + room.name;
  $("messages").replaceChildren();
  const page = await api(messagesPath(room) + "?limit=50");
  if (state.open !== key) return;
  for (const m of page.messages) $("messages").append(messageElement(m));
  state.oldest = page.messages.length ? page.messages[0].id : null;
  state.exhausted = page.messages.length === 0;
  room.unread = 0;
  setUnread(room);
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
  $("compose").focus();
}

// Scrolling to the top pages back.
async function loadOlder() {
  const room = state.rooms.get(state.open);
  if (!room || !state.oldest || state.loadingOlder || state.exhausted) return;
  state.loadingOlder = true;
  try {
    const key = state.open;
    const page = await api(messagesPath(room) + "?limit=50&before=" + seg(state.oldest));
    if (state.open !== key) return;
    const box = $("messages");
    const before = box.scrollHeight;
    const frag = document.createDocumentFragment();
    for (const m of page.messages) {
      if (!box.querySelector('[data-message-id="' + CSS.escape(m.id) + '"]')) frag.append(messageElement(m));
    }
    box.prepend(frag);
    box.scrollTop += box.scrollHeight - before;
    if (page.messages.length) state.oldest = page.messages[0].id;
    else state.exhausted = true;
  } catch (e) {
    showError(e.message);
  } finally {
    state.loadingOlder = false;
  }
}

// ---- live events -----------------------------------------------------------------

function onMessage(backend, m) {
  const key = roomKey(backend, m.recipient);
  const room = state.rooms.get(key) || addRoom({ backend, id: m.recipient, name: m.recipient, unread: 0 });
  if (state.open !== key) {
    room.unread += 1;
    setUnread(room);
    return;
  }
  const box = $("messages");
  const old = box.querySelector('[data-message-id="' + CSS.escape(m.id) + '"]');
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  if (old) old.replaceWith(messageElement(m));
  else box.append(messageElement(m));
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function connect() {
  if (state.source) state.source.close();
  // EventSource cannot send headers: the token goes in the query. It
  // reconnects by itself and sends Last-Event-ID, so nothing is missed.
  const src = new EventSource("/api/v1/stream?access_token=" + seg(state.token));
  state.source = src;
  const data = (ev) => JSON.parse(ev.data);
  src.onopen = () => { $("conn").textContent = "live"; };
  src.onerror = () => { $("conn").textContent = "reconnecting..."; };
  src.addEventListener("MessageUpsert", (ev) => { const d = data(ev); onMessage(d.backend, d.value); });
  src.addEventListener("MessageDelete", (ev) => {
    const d = data(ev);
    const e = document.querySelector('#messages [data-message-id="' + CSS.escape(d.value) + '"]');
    if (e) e.remove();
  });
  src.addEventListener("RoomUpsert", (ev) => { const d = data(ev); addRoom({ backend: d.backend, id: d.value.id, name: d.value.name }); });
  src.addEventListener("RoomDelete", (ev) => {
    const d = data(ev);
    const key = roomKey(d.backend, d.value);
    const room = state.rooms.get(key);
    if (room) { room.el.remove(); state.rooms.delete(key); }
  });
}

// ---- sending ------------------------------------------------------------------------

async function send() {
  const box = $("compose");
  const text = box.value;
  const room = state.rooms.get(state.open);
  if (!room || !text.trim()) return;
  box.value = "";
  try {
    await api(messagesPath(room), {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text }),
    });
  } catch (e) {
    box.value = text;
    showError("not sent: " + e.message);
  }
}

// ---- status (admins) ------------------------------------------------------------------

function table(headers, rows) {
  return el("table", null,
    el("tr", null, ...headers.map((h) => el("th", { text: h }))),
    ...rows.map((r) => el("tr", null, ...r.map((c) => el("td", { text: c == null ? "" : String(c) })))));
}

async function showStatus() {
  const st = await api("/status");
  const body = $("status-body");
  body.replaceChildren(
    el("h3", { text: "Backends" }),
    table(["name", "kind", "state", "restarts"], (st.backends || []).map((b) => [b.name, b.kind, b.state, b.restarts])),
    el("h3", { text: "Federation peers" }),
    table(["server", "queued", "inbox", "last error"], (st.peers || []).map((p) => [p.server_id, p.queued, p.inbox, p.last_error])),
    el("h3", { text: "Rules" }),
    table(["file", "loads", "failures", "last error"], st.rules ? [[st.rules.file, st.rules.loads, st.rules.failures, st.rules.last_error]] : []));
  $("room").hidden = true;
  $("status").hidden = false;
}

// ---- logging in -------------------------------------------------------------------------

async function login() {
  showError("");
  try {
    await loadRooms();
  } catch (e) {
    showError(e.status === 401 ? "that token is not valid" : e.message);
    return;
  }
  localStorage.setItem("segue.token", state.token);
  $("logout").hidden = false;
  document.body.dataset.loggedIn = "true";
  connect();
  try {
    await api("/status");
    $("status-button").hidden = false;
  } catch (e) {
    $("status-button").hidden = true;  // not an admin
  }
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  login();
});
$("logout").addEventListener("click", () => {
  localStorage.removeItem("segue.token");
  location.reload();
});
$("status-button").addEventListener("click", () => showStatus().catch((e) => showError(e.message)));
$("compose").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    send();
  }
});
$("send").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
$("messages").addEventListener("scroll", () => { if ($("messages").scrollTop < 30) loadOlder(); });

if (state.token) {
  $("token").value = state.token;
  login();
}
