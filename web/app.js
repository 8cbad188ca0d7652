// Vigil page: shares a camera or screen over WebRTC (or has Vigil play a stream URL or an uploaded file) and shows
// what Vigil decides every second.
// The protocol it speaks is docs/protocol.md.
"use strict";

const ICE_GATHER_TIMEOUT_MS = 5000;
const PING_INTERVAL_MS = 5000;
const PONG_LATE_MS = 15000;
const MAX_FRAMERATE = 5;
const MAX_BITRATE = 400_000; // what Vigil asks for in its answer (VIGIL_VIDEO_MAX_KBPS)
const MAX_MARKS = 900;
const MAX_RESPONSES = 200;
const LATENCY_WINDOW = 60;
// Tries to connect again, 1 s, 2 s, ... apart (at most RECONNECT_MAX_WAIT_MS): about a minute in all, more than
// a network outage that fails the connection lasts (ICE gives up on a silent path after ~30 s). There is no ICE
// restart: Vigil's aiortc cannot take one, so each try is a new peer connection on the same session and token.
const RECONNECT_ATTEMPTS = 15;
const RECONNECT_MAX_WAIT_MS = 5000;
// A new connection whose data channel is not open by then found no path through the network: try again.
const OPEN_TIMEOUT_MS = 10000;
// Vigil sends a tick message every second while it runs the session: this long without any message means its
// replica is gone (WebRTC itself notices only after many seconds), and the page connects again to resume.
const SILENCE_MS = 4000;
const PENDING_LIMIT = 8;

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), stop: $("stop"), camera: $("source-camera"), screen: $("source-screen"),
  apiKey: $("api-key"), preview: $("preview"), status: $("status"), error: $("error"),
  modelName: $("model-name"), demoNote: $("demo-note"),
  form: $("instruction-form"), input: $("instruction-input"), ask: $("ask"), clear: $("clear-instructions"),
  instructions: $("instructions"), instructionsEmpty: $("instructions-empty"),
  timeline: $("timeline"), latency: $("latency"), responses: $("responses"),
  responsesEmpty: $("responses-empty"), speak: $("speak-toggle"),
  recallForm: $("recall-form"), recallInput: $("recall-input"), recallAnswer: $("recall-answer"),
  recallQuery: $("recall-query"), recallLines: $("recall-lines"),
  url: $("source-url"), file: $("source-file"), sourceOptions: $("source-options"),
  urlField: $("source-url-field"), urlInput: $("source-url-input"), fileField: $("source-file-field"),
  fileInput: $("source-file-input"), loop: $("source-loop"), sourceState: $("source-state"),
};

const state = {
  session: null,   // the 201 body of POST /v1/sessions
  stream: null,
  pc: null,
  dc: null,
  pingTimer: null,
  silenceTimer: null,
  lastMessageAt: 0,
  pingSeq: 0,
  pingsSent: new Map(),
  lastPongAt: 0,
  rttMs: null,
  latencies: [],
  pending: [],     // instructions typed before a session exists
  running: false,
  reconnecting: false,
  attempts: 0,     // reconnection attempts since the channel was last open
  sourceAttached: false,  // a URL or file source was handed to Vigil for this session
  source: null,           // its newest state (a `source` message)
  previewUrl: null,       // the object URL of a file shown in the preview
  shownTicks: new Set(),  // the keys ("<session_id>:<tick>") of the ticks shown, newest MAX_MARKS
};

class VigilError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// ---------- small helpers ----------

function formatStreamTime(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(Math.floor(s / 3600))}:${pad(Math.floor((s % 3600) / 60))}:${pad(s % 60)}`;
}

function formatMs(ms) {
  return Number.isFinite(ms) ? `${Math.round(ms)} ms` : "–";
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function setStatus(key, text) {
  ui.status.dataset.state = key;
  ui.status.textContent = text;
}

function showError(code, message) {
  ui.error.replaceChildren();
  const text = document.createElement("span");
  text.textContent = message || "Something went wrong.";
  ui.error.append(text);
  if (code) {
    const small = document.createElement("code");
    small.textContent = code;
    ui.error.append(" ", small);
  }
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

function reportError(err) {
  if (err instanceof VigilError) showError(err.code, err.message);
  else showError("client_error", (err && err.message) || String(err));
}

// The session id of a path like v1/sessions/<id>/...: sent as x-session-id too, by which Vigil routes every call
// of a session to the replica that holds its connection.
function sessionOfPath(path) {
  const match = /^v1\/sessions\/([^/]+)/.exec(path);
  return match ? decodeURIComponent(match[1]) : null;
}

async function api(method, path, token, body) {
  const headers = {};
  const upload = body instanceof Blob;  // a file goes as it is, its name in x-filename
  if (upload) {
    headers["Content-Type"] = body.type || "application/octet-stream";
    if (body.name) headers["x-filename"] = encodeURIComponent(body.name);
  } else if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const sessionId = sessionOfPath(path);
  if (sessionId) headers["x-session-id"] = sessionId;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined || upload ? body : JSON.stringify(body) });
  } catch (err) {
    throw new VigilError("network_error", `Cannot reach Vigil: ${err.message}`);
  }
  let data = null;
  try { data = await response.json(); } catch { /* a body that is not JSON: judged by the status below */ }
  if (!response.ok) {
    const error = data && data.error;
    throw new VigilError(
      (error && error.code) || `http_${response.status}`,
      (error && error.message) || `Vigil answered ${response.status} ${response.statusText}`.trim(),
    );
  }
  return data;
}

// ---------- media and peer connection ----------

async function openSource() {
  const video = { frameRate: { ideal: MAX_FRAMERATE, max: 15 }, width: { ideal: 640 }, height: { ideal: 480 } };
  if (ui.screen.checked) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getDisplayMedia) {
      throw new VigilError("unsupported", "This browser cannot share the screen.");
    }
    return navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: MAX_FRAMERATE, max: 15 } }, audio: false });
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new VigilError("unsupported", "This browser cannot open a camera (a secure origin is needed).");
  }
  return navigator.mediaDevices.getUserMedia({ video, audio: false });
}

function iceGatheringComplete(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

async function connectPeer() {
  const { session_id: id, token } = state.session;
  // TURN credentials from Vigil when it has a relay (deployments behind NAT); none otherwise.
  const pc = new RTCPeerConnection({ iceServers: state.session.iceServers || [] });
  state.pc = pc;
  // The channel must exist before the offer so that the offer carries its m=application section.
  const dc = pc.createDataChannel("vigil");
  state.dc = dc;
  if (state.stream) {
    const track = state.stream.getVideoTracks()[0];
    const encoding = { maxFramerate: MAX_FRAMERATE, maxBitrate: MAX_BITRATE };
    try {
      // Two temporal layers: Vigil decodes the lower one only (a frame in two), which is all its ticks need.
      pc.addTransceiver(track, {
        direction: "sendonly", streams: [state.stream], sendEncodings: [{ ...encoding, scalabilityMode: "L1T2" }],
      });
    } catch (error) {
      // A browser without temporal layers sends every frame in one layer, all of which Vigil decodes.
      pc.addTransceiver(track, { direction: "sendonly", streams: [state.stream], sendEncodings: [encoding] });
    }
  } else {
    // Vigil reads the video itself (a URL or an upload): the offer still has its video section, and sends nothing.
    pc.addTransceiver("video", { direction: "recvonly" });
  }
  dc.onopen = () => { if (dc === state.dc) onChannelOpen(); };
  dc.onclose = () => { if (dc === state.dc) onConnectionLost("The data channel closed."); };
  dc.onmessage = (event) => { if (dc === state.dc) onMessage(event.data); };
  pc.onconnectionstatechange = () => {
    if (pc !== state.pc) return;
    if (pc.connectionState === "failed") onConnectionLost("The connection failed.");
    else if (pc.connectionState === "disconnected") setStatus("unstable", "Connection unstable…");
    else if (pc.connectionState === "connected" && dc.readyState === "open") setStatus("live", "Live");
  };

  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringComplete(pc, ICE_GATHER_TIMEOUT_MS);
  const answer = await api("POST", `v1/sessions/${encodeURIComponent(id)}/offer`, token,
    { type: "offer", sdp: pc.localDescription.sdp });
  if (pc !== state.pc) return;
  if (answer.iceServers) state.session.iceServers = answer.iceServers;  // fresh ones for a reconnect
  await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  setStatus("connecting", "Connecting…");
  setTimeout(() => {
    if (pc === state.pc && dc.readyState !== "open") onConnectionLost("The connection did not open.");
  }, OPEN_TIMEOUT_MS);
}

function closePeer() {
  clearInterval(state.pingTimer);
  state.pingTimer = null;
  clearInterval(state.silenceTimer);
  state.silenceTimer = null;
  state.pingsSent.clear();
  const { pc, dc } = state;
  state.pc = null;
  state.dc = null;
  if (dc) { try { dc.close(); } catch { /* already closed */ } }
  if (pc) pc.close();
}

function onChannelOpen() {
  state.attempts = 0;
  setStatus("live", "Live");
  state.lastPongAt = Date.now();
  state.lastMessageAt = Date.now();
  sendPing();
  state.pingTimer = setInterval(sendPing, PING_INTERVAL_MS);
  if (readsSource()) ensureSource();
  state.silenceTimer = setInterval(() => {
    if (Date.now() - state.lastMessageAt > SILENCE_MS) onConnectionLost("Vigil stopped answering.", { atOnce: true });
  }, 1000);
}

async function onConnectionLost(reason, { atOnce = false } = {}) {
  if (!state.running || state.reconnecting) return;
  state.reconnecting = true;
  closePeer();
  while (state.running && state.attempts < RECONNECT_ATTEMPTS) {
    const attempt = ++state.attempts;
    setStatus("reconnecting", `Reconnecting (${attempt}/${RECONNECT_ATTEMPTS})…`);
    // A replica that drains asks for it: the first try goes at once, to another replica.
    await sleep(atOnce && attempt === 1 ? 0 : Math.min(1000 * attempt, RECONNECT_MAX_WAIT_MS));
    if (!state.running) break;
    try {
      await connectPeer();
      state.reconnecting = false;
      return;
    } catch (err) {
      closePeer();
      if (err instanceof VigilError && ["unauthorized", "unknown_session"].includes(err.code)) {
        reportError(err);
        break;
      }
    }
  }
  state.reconnecting = false;
  if (state.running) {
    if (ui.error.hidden) showError("disconnected", `${reason} Vigil could not be reached again.`);
    await stop({ keepError: true });
  }
}

// ---------- data channel ----------

function send(message) {
  const { dc, session } = state;
  if (!dc || dc.readyState !== "open") {
    showError("not_connected", "Vigil is not connected yet.");
    return false;
  }
  const data = JSON.stringify(message);
  const limit = (session && session.limits && session.limits.max_message_bytes) || 4096;
  if (new TextEncoder().encode(data).length > limit) {
    showError("message_too_large", `That message is longer than Vigil accepts (${limit} bytes).`);
    return false;
  }
  dc.send(data);
  return true;
}

function sendPing() {
  if (!state.dc || state.dc.readyState !== "open") return;
  if (Date.now() - state.lastPongAt > PONG_LATE_MS) setStatus("unstable", "Live · no heartbeat reply");
  const id = ++state.pingSeq;
  state.pingsSent.set(id, performance.now());
  state.dc.send(JSON.stringify({ type: "ping", id }));
}

function onMessage(data) {
  state.lastMessageAt = Date.now();
  let message;
  try { message = JSON.parse(data); } catch { return; }
  if (!message || typeof message !== "object") return;
  switch (message.type) {
    case "hello":
      showModel(message.model);
      renderInstructions(message.instructions || []);
      if (message.resumed) showResumed(message.resumed);
      break;
    case "reconnect":
      onConnectionLost(message.message || "Vigil asked to reconnect.", { atOnce: true });
      break;
    case "instructions":
      renderInstructions(message.items || []);
      break;
    case "tick":
      onTick(message);
      break;
    case "source":
      showSource(message);
      break;
    case "recall":
      showRecall(message.query, message.lines || []);
      break;
    case "delegation":
      showDelegation(message);
      break;
    case "error":
      showError(message.code, message.message);
      break;
    case "pong": {
      const sentAt = state.pingsSent.get(message.id);
      state.pingsSent.delete(message.id);
      state.lastPongAt = Date.now();
      if (sentAt !== undefined) state.rttMs = performance.now() - sentAt;
      if (state.pc && state.pc.connectionState !== "disconnected") {
        setStatus("live", `Live · heartbeat ${formatMs(state.rttMs)}`);
      }
      break;
    }
    default:
      break;
  }
}

// ---------- rendering ----------

function showResumed(resumed) {
  const missed = Math.round(Number(resumed.missed_s) || 0);
  const note = document.createElement("li");
  note.className = "resumed";
  note.textContent = `Reconnected at ${formatStreamTime(Number(resumed.stream_time) || 0)}, ${missed} s of video missed`;
  appendToResponses(note);
  setStatus("live", `Live · reconnected, ${missed} s of video missed`);
}

function showModel(model) {
  if (!model) return;
  const name = [model.engine, model.model].filter(Boolean).join(" · ");
  ui.modelName.textContent = `Model: ${name || "unknown"}`;
  ui.demoNote.textContent = model.note || "This demo model only reacts to its trigger.";
  ui.demoNote.hidden = !model.demo;
}

function renderInstructions(items, pending = false) {
  ui.instructions.replaceChildren(...items.map((text) => {
    const li = document.createElement("li");
    li.textContent = text;
    if (pending) li.classList.add("pending");
    return li;
  }));
  ui.instructionsEmpty.hidden = items.length > 0;
}

function outcomeClass(outcome) {
  return String(outcome).startsWith("skipped") ? "skipped" : String(outcome);
}

// A tick is shown once: one whose key was shown already (a message sent again) is left out.
function firstShowing(tick) {
  if (typeof tick.key !== "string") return true;
  if (state.shownTicks.has(tick.key)) return false;
  state.shownTicks.add(tick.key);
  if (state.shownTicks.size > MAX_MARKS) state.shownTicks.delete(state.shownTicks.values().next().value);
  return true;
}

function onTick(tick) {
  if (!firstShowing(tick)) return;
  const kind = outcomeClass(tick.outcome);
  const latency = typeof tick.latency_ms === "number" ? tick.latency_ms : NaN;
  const mark = document.createElement("span");
  mark.className = `mark ${kind}`;
  mark.dataset.outcome = tick.outcome;
  mark.dataset.tick = tick.tick;
  mark.setAttribute("role", "listitem");
  mark.title = `tick ${tick.tick} · ${tick.outcome} · ${formatStreamTime(tick.stream_time)} · ${formatMs(latency)}`;
  mark.setAttribute("aria-label", mark.title);
  const atEnd = ui.timeline.scrollLeft + ui.timeline.clientWidth >= ui.timeline.scrollWidth - 24;
  ui.timeline.append(mark);
  while (ui.timeline.childElementCount > MAX_MARKS) ui.timeline.firstElementChild.remove();
  if (atEnd) ui.timeline.scrollLeft = ui.timeline.scrollWidth;

  if (kind !== "skipped" && Number.isFinite(latency)) {
    state.latencies.push(latency);
    if (state.latencies.length > LATENCY_WINDOW) state.latencies.shift();
    const sorted = [...state.latencies].sort((a, b) => a - b);
    const p50 = sorted[Math.floor((sorted.length - 1) / 2)];
    ui.latency.textContent = `Latency: last ${formatMs(latency)} · p50 ${formatMs(p50)} (${sorted.length} ticks)`;
  }
  if (kind === "respond" || kind === "delegate") addResponse(tick, kind, latency);
}

function addResponse(tick, kind, latency) {
  const li = document.createElement("li");
  li.className = `response ${kind}`;
  li.dataset.streamTime = tick.stream_time;
  li.dataset.outcome = kind;
  const meta = document.createElement("p");
  meta.className = "meta";
  const time = document.createElement("time");
  time.textContent = formatStreamTime(tick.stream_time);
  meta.append(time, ` · ${formatMs(latency)}`);
  if (kind === "delegate") {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "delegated";
    meta.append(" ", badge);
  }
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = tick.text || "";
  li.append(meta, text);
  if (kind === "delegate" && tick.question) {
    const question = document.createElement("p");
    question.className = "question";
    question.textContent = `Handed to the background brain: ${tick.question}`;
    const status = document.createElement("p");
    status.className = "delegation-status";
    status.textContent = "Working on it…";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "small cancel-delegation";
    cancel.textContent = "Cancel";
    // A delegation's id is the number of the tick that made it.
    cancel.addEventListener("click", () => send({ type: "cancel", delegation: String(tick.tick) }));
    li.dataset.delegation = String(tick.tick);
    li.append(question, status, cancel);
  }
  appendToResponses(li);
  speak(tick.text);
}

const DELEGATION_STATUS = {
  done: "Answered",
  failed: "No answer",
  timed_out: "No answer in time",
  cancelled: "Cancelled",
};

// A delegation's one result: on its card when the card is still shown, else as a card of its own. A result that
// is more than a sentence (a table, an HTML page, a chart) gets its own block; HTML runs in a sandboxed frame
// with no scripts, so a page from the brain cannot reach this one.
function showDelegation(result) {
  let li = ui.responses.querySelector(`li[data-delegation="${CSS.escape(String(result.id))}"]`);
  if (!li) {
    li = document.createElement("li");
    li.className = "response delegate";
    li.dataset.delegation = String(result.id);
    const question = document.createElement("p");
    question.className = "question";
    question.textContent = `Handed to the background brain: ${result.question || ""}`;
    li.append(question);
    appendToResponses(li);
  }
  li.querySelector(".cancel-delegation")?.remove();
  li.querySelector(".delegation-status")?.remove();
  li.dataset.status = result.status;
  const status = document.createElement("p");
  status.className = `delegation-status ${result.status}`;
  const label = DELEGATION_STATUS[result.status] || result.status;
  status.textContent = result.status === "done" ? `${label} · ${formatMs(1000 * result.duration_s)}`
    : `${label}${result.reason ? `: ${result.reason}` : ""}`;
  li.append(status);
  if (result.status === "done") {
    const answer = document.createElement("p");
    answer.className = "delegation-answer";
    answer.textContent = result.full_text || result.text || "";
    li.append(answer);
    if (result.rich) li.append(richPart(result.rich));
    speak(result.text);
  }
}

function richPart(rich) {
  if (rich.kind === "html") {
    const frame = document.createElement("iframe");
    frame.className = "rich html";
    frame.setAttribute("sandbox", "");
    frame.setAttribute("referrerpolicy", "no-referrer");
    frame.title = "Result from the background brain";
    frame.srcdoc = String(rich.content);
    return frame;
  }
  const block = document.createElement("pre");
  block.className = `rich ${rich.kind}`;
  block.textContent = String(rich.content);
  return block;
}

function showRecall(query, lines) {
  ui.recallQuery.textContent = query;
  const items = lines.length ? lines : ["Nothing in memory matches that yet."];
  ui.recallLines.replaceChildren(...items.map((line) => {
    const li = document.createElement("li");
    li.textContent = line;
    if (!lines.length) li.classList.add("muted");
    return li;
  }));
  ui.recallAnswer.hidden = false;
}

function addUserQuestion(text) {
  const li = document.createElement("li");
  li.className = "user-question";
  li.textContent = `You asked: ${text}`;
  appendToResponses(li);
}

function appendToResponses(li) {
  const list = ui.responses;
  const atEnd = list.scrollTop + list.clientHeight >= list.scrollHeight - 24;
  list.append(li);
  while (list.childElementCount > MAX_RESPONSES) list.firstElementChild.remove();
  if (atEnd) list.scrollTop = list.scrollHeight;
  ui.responsesEmpty.hidden = true;
}

function speak(text) {
  if (!text || !ui.speak.checked || !("speechSynthesis" in window)) return;
  window.speechSynthesis.speak(new SpeechSynthesisUtterance(text));
}

// ---------- a source Vigil reads itself: a stream URL or a video file ----------

const SOURCE_STATES = {
  connecting: "connecting…", playing: "playing", reconnecting: "reconnecting…", ended: "ended", failed: "failed",
  stopped: "stopped",
};

function readsSource() {
  return ui.url.checked || ui.file.checked;
}

function showSourceOptions() {
  ui.sourceOptions.hidden = !readsSource();
  ui.urlField.hidden = !ui.url.checked;
  ui.fileField.hidden = !ui.file.checked;
}

function setSourceControlsDisabled(disabled) {
  for (const control of [ui.camera, ui.screen, ui.url, ui.file, ui.urlInput, ui.fileInput, ui.loop]) {
    control.disabled = disabled;
  }
}

function checkSourceInput() {
  if (ui.url.checked && !ui.urlInput.value.trim()) {
    throw new VigilError("invalid_request", "Give the URL of a stream (rtsp://…, http://…) for Vigil to play.");
  }
  if (ui.file.checked && !ui.fileInput.files.length) {
    throw new VigilError("invalid_request", "Choose a video file for Vigil to play.");
  }
}

function previewFile() {
  const empty = ui.preview.closest(".preview").querySelector(".preview-empty");
  empty.textContent = ui.url.checked ? "Vigil reads this stream itself: no preview here" : "No video shared";
  if (!ui.file.checked) return;
  state.previewUrl = URL.createObjectURL(ui.fileInput.files[0]);
  ui.preview.src = state.previewUrl;
  ui.preview.loop = ui.loop.checked;
  ui.preview.play().catch(() => { /* a preview only: Vigil plays the file itself */ });
  ui.preview.closest(".preview").classList.add("has-video");
}

function showSource(source) {
  if (!source || !source.state) return;
  let text = `${source.source || "Source"}: ${SOURCE_STATES[source.state] || source.state}`;
  if (source.state === "reconnecting" && source.attempt) {
    text += ` (try ${source.attempt}${source.retry_in_s ? `, next in ${source.retry_in_s} s` : ""})`;
  }
  if (source.reason) text += ` · ${source.reason}`;
  state.source = source;
  ui.sourceState.textContent = text;
  ui.sourceState.dataset.state = source.state;
  ui.sourceState.hidden = false;
}

// Hand the URL or the file to Vigil once the channel is open (its state messages come on it). After a reconnection
// the source is still there on the same replica; on another one (a drain), it is handed over again.
async function ensureSource() {
  const { session_id: id, token } = state.session;
  const path = `v1/sessions/${encodeURIComponent(id)}`;
  try {
    if (state.sourceAttached) {
      try {
        showSource((await api("GET", `${path}/source`, token)).source);
        return;
      } catch (err) {
        if (err.code !== "no_source") throw err;
      }
    }
    state.sourceAttached = true;
    state.source = null;
    const reply = ui.url.checked
      ? await api("POST", `${path}/source`, token, { url: ui.urlInput.value.trim(), loop: ui.loop.checked })
      : await api("POST", `${path}/upload?loop=${ui.loop.checked}`, token, ui.fileInput.files[0]);
    // The reply's state is older than any `source` message that came meanwhile on the channel.
    if (state.session && state.session.session_id === id && !state.source) showSource(reply.source);
  } catch (err) {
    if (!state.session || state.session.session_id !== id) return;
    reportError(err);
    await stop({ keepError: true });
  }
}

// ---------- user actions ----------

async function start() {
  clearError();
  ui.start.disabled = true;
  setSourceControlsDisabled(true);
  state.running = true;
  state.sourceAttached = false;
  ui.sourceState.hidden = true;
  setStatus("starting", "Opening the video source…");
  try {
    if (readsSource()) {
      checkSourceInput();
      previewFile();
    } else {
      state.stream = await openSource();
      ui.preview.srcObject = state.stream;
      ui.preview.closest(".preview").classList.add("has-video");
      const track = state.stream.getVideoTracks()[0];
      track.addEventListener("ended", () => { if (state.running) stop(); });
      track.applyConstraints({ frameRate: { max: MAX_FRAMERATE } }).catch(() => { /* the encoder cap still holds */ });
    }

    setStatus("starting", "Creating a session…");
    const body = state.pending.length ? { instructions: state.pending } : {};
    const session = await api("POST", "v1/sessions", ui.apiKey.value.trim(), body);
    state.session = session;
    if (!state.running) {
      // Stopped while the session was being created (the shared screen ended): end it too.
      state.session = null;
      await api("DELETE", `v1/sessions/${encodeURIComponent(session.session_id)}`, session.token).catch(() => {});
      return;
    }
    state.attempts = 0;
    state.pending = [];
    showModel(state.session.model);
    ui.stop.disabled = false;
    setStatus("connecting", "Sending the offer…");
    await connectPeer();
  } catch (err) {
    reportError(err);
    await stop({ keepError: true });
  }
}

async function stop({ keepError = false } = {}) {
  if (!keepError) clearError();
  state.running = false;
  closePeer();
  if (state.stream) state.stream.getTracks().forEach((track) => track.stop());
  state.stream = null;
  ui.preview.srcObject = null;
  if (state.previewUrl) {
    ui.preview.removeAttribute("src");
    ui.preview.load();
    URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = null;
  }
  ui.preview.closest(".preview").classList.remove("has-video");
  ui.preview.closest(".preview").querySelector(".preview-empty").textContent = "No video shared";
  if (state.source && !["ended", "failed", "stopped"].includes(state.source.state)) {
    showSource({ ...state.source, state: "stopped", reason: null });
  }
  state.source = null;
  if ("speechSynthesis" in window) window.speechSynthesis.cancel();
  const session = state.session;
  state.session = null;
  ui.stop.disabled = true;
  ui.start.disabled = false;
  setSourceControlsDisabled(false);
  setStatus(keepError && !ui.error.hidden ? "error" : "stopped", keepError && !ui.error.hidden ? "Stopped after an error" : "Stopped");
  if (session) {
    try {
      await api("DELETE", `v1/sessions/${encodeURIComponent(session.session_id)}`, session.token);
    } catch (err) {
      if (err.code !== "unknown_session") reportError(err);
    }
  }
}

function takeInput() {
  const text = ui.input.value.trim();
  if (!text) {
    ui.input.focus();
    return null;
  }
  return text;
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = takeInput();
  if (!text) return;
  clearError();
  if (state.session) {
    if (send({ type: "instruction", text })) ui.input.value = "";
  } else if (state.pending.length >= PENDING_LIMIT) {
    showError("too_many_instructions", `At most ${PENDING_LIMIT} standing instructions.`);
  } else {
    state.pending.push(text);
    renderInstructions(state.pending, true);
    ui.input.value = "";
  }
});

ui.ask.addEventListener("click", () => {
  const text = takeInput();
  if (!text) return;
  clearError();
  if (!state.session) {
    showError("not_connected", "Start a session first, then ask.");
  } else if (send({ type: "question", text })) {
    addUserQuestion(text);
    ui.input.value = "";
  }
});

ui.recallForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.recallInput.value.trim();
  if (!text) {
    ui.recallInput.focus();
    return;
  }
  clearError();
  if (!state.session) {
    showError("not_connected", "Start a session first, then ask its memory.");
  } else if (send({ type: "recall", text })) {
    ui.recallInput.value = "";
  }
});

ui.clear.addEventListener("click", () => {
  clearError();
  if (state.session) send({ type: "clear_instructions" });
  else {
    state.pending = [];
    renderInstructions([], true);
  }
});

ui.speak.addEventListener("change", () => {
  if (!ui.speak.checked && "speechSynthesis" in window) window.speechSynthesis.cancel();
});
if (!("speechSynthesis" in window)) {
  ui.speak.disabled = true;
  ui.speak.parentElement.title = "This browser cannot speak.";
}

for (const radio of [ui.camera, ui.screen, ui.url, ui.file]) radio.addEventListener("change", showSourceOptions);
showSourceOptions();
ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", () => stop());
window.addEventListener("pagehide", () => {
  const session = state.session;
  if (!session) return;
  fetch(`v1/sessions/${encodeURIComponent(session.session_id)}`, {
    method: "DELETE", keepalive: true,
    headers: { Authorization: `Bearer ${session.token}`, "x-session-id": session.session_id },
  }).catch(() => {});
});
renderInstructions([]);
