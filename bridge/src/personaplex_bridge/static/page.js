// The /test-voice page: one websocket to the bridge (same origin), the microphone path (mic.js), the
// reply path (player.js), and the panels. `window.voiceTest` exposes counters for the browser test.

import { Microphone, SAMPLE_RATE } from "./mic.js";
import { Player } from "./player.js";

const KIND_AUDIO = 0x01;
const STATUS_POLL_MS = 3000;

const $ = (id) => document.getElementById(id);

const counters = {
  framesSent: 0, // 0x01 frames sent (Ogg pages of the microphone, headers included)
  transcriptEvents: 0,
  audioFramesDecoded: 0, // AudioData outputs of the reply decoder
  samplesPlayed: 0, // reply samples that played to the end of their buffer
  replyFrames: 0, // 0x01 frames received
  masResponses: 0,
  interrupted: 0, // tts_interrupted events acted on
  stoppedSources: 0, // buffers cut off by those
  underruns: 0, // gaps inside a reply: its audio arrived later than it played
  jsErrors: 0,
  lastDelayMs: null, // end of the user's speech (or the typed turn's send) to the first reply audio
  errors: [], // every readable error shown on the page
  events: [], // every JSON event's type, in order
  connected: false,
  voice: null, // "agent" | "duplex" | null
  get playing() {
    return player !== null && player.playing;
  },
};
window.voiceTest = counters;

let ws = null;
let context = null;
let mic = null;
let player = null;
let turnStartedAt = null; // reference time for the delay of the next reply
let liveWords = [];
let statusTimer = null;
let voiceEndedAt = -Infinity; // performance.now() when the page last stopped streaming audio
const IN_FLIGHT_MS = 2000;

// --- errors: every one is shown, readable, and counted ---

function showError(text) {
  counters.errors.push(text);
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  $("errors").prepend(item);
  $("errors-panel").classList.add("has-errors");
}

window.addEventListener("error", (event) => {
  counters.jsErrors += 1;
  showError(`page error: ${event.message}`);
});
window.addEventListener("unhandledrejection", (event) => {
  counters.jsErrors += 1;
  showError(`page error: ${event.reason?.message ?? event.reason}`);
});

// --- small rendering helpers ---

function log(text) {
  const line = document.createElement("div");
  line.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  const box = $("log");
  box.append(line);
  while (box.childElementCount > 200) box.firstElementChild.remove();
  box.scrollTop = box.scrollHeight;
}

function renderList(id, items) {
  const box = $(id);
  box.replaceChildren();
  if (!Array.isArray(items) || items.length === 0) {
    const none = document.createElement("div");
    none.className = "muted";
    none.textContent = "none";
    box.append(none);
    return;
  }
  for (const item of items) {
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(item, null, 2);
    box.append(pre);
  }
}

function setState(id, state, reason) {
  const cell = $(id);
  cell.textContent = state ?? "?";
  cell.className = `state state-${state}`;
  if (reason) cell.title = reason;
}

function setConnection(text, ok) {
  $("connection").textContent = text;
  $("connection").className = ok ? "ok" : "bad";
}

function updateVoiceButtons() {
  const open = counters.connected;
  $("agent-start").disabled = !open || counters.voice !== null;
  $("duplex-start").disabled = !open || counters.voice !== null;
  $("voice-stop").disabled = !open || counters.voice === null;
  $("send").disabled = !open;
  $("connect").hidden = open;
  $("voice-state").textContent = counters.voice ? `voice on (${counters.voice})` : "voice off";
}

// --- backends: ready, then /status every few seconds ---

function showReady(event) {
  setState("st-mas", event.mas);
  setState("st-tts", event.tts);
  setState("st-asr", event.asr);
  setState("st-moshi", event.moshi);
  $("session").textContent = event.session;
}

async function pollStatus() {
  try {
    const response = await fetch("/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    setState("st-mas", status.mas.state, status.mas.reason);
    setState("st-tts", status.tts.state, status.tts.reason);
    setState("st-asr", status.asr.state, status.asr.reason);
    const backends = status.moshi.backends ?? [];
    if (backends.length === 0) setState("st-moshi", "off", "no Moshi configured (BRIDGE_MOSHI_URLS)");
    else setState("st-moshi", status.moshi.state, backends.map((b) => `${b.url}: ${b.state} (${b.reason})`).join("\n"));
    $("sessions").textContent = `${status.sessions.active} open, ${status.sessions.voice} in voice`;
  } catch (e) {
    $("sessions").textContent = `/status failed: ${e.message}`;
  }
}

// --- the websocket ---

function tokenRequired() {
  return document.querySelector('meta[name="bridge-token-required"]')?.content === "true";
}

function currentToken() {
  return $("token").value.trim();
}

function connect() {
  if (ws) return;
  const token = currentToken();
  if (tokenRequired() && !token) {
    $("token-row").hidden = false;
    setConnection("this bridge needs a token: enter it and press Connect", false);
    return;
  }
  if (token) sessionStorage.setItem("bridge-token", token);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  const socket = new WebSocket(`${scheme}://${location.host}/ws${query}`);
  socket.binaryType = "arraybuffer";
  ws = socket;
  let opened = false;
  setConnection("connecting...", false);
  socket.onopen = () => {
    opened = true;
  };
  socket.onmessage = (message) => onMessage(message.data);
  socket.onclose = (event) => {
    if (ws === socket) ws = null;
    counters.connected = false;
    stopVoiceLocally();
    updateVoiceButtons();
    if (!opened) {
      const hint = tokenRequired() ? "a wrong token? " : "";
      showError(`the bridge refused the connection (${hint}is this page's origin in BRIDGE_ALLOWED_ORIGINS? ` +
        "is the bridge full or draining? see its /status)");
      if (tokenRequired()) $("token-row").hidden = false;
      setConnection("not connected", false);
    } else {
      setConnection(`closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`, false);
    }
  };
}

function send(obj) {
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    showError("not connected to the bridge");
    return false;
  }
  ws.send(JSON.stringify(obj));
  return true;
}

function onMessage(data) {
  if (data instanceof ArrayBuffer) {
    const bytes = new Uint8Array(data);
    if (bytes[0] !== KIND_AUDIO) {
      showError(`unexpected binary frame of kind ${bytes[0]}`);
      return;
    }
    counters.replyFrames += 1;
    ensureAudio().catch((e) => showError(`audio: ${e.message}`));
    player.push(bytes.subarray(1));
    return;
  }
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    showError("the bridge sent a text frame that is not JSON");
    return;
  }
  counters.events.push(event.type);
  const handler = handlers[event.type];
  if (handler) handler(event);
  else log(`unknown event ${event.type}`);
}

const handlers = {
  ready(event) {
    counters.connected = true;
    setConnection(`connected, session ${event.session}`, true);
    $("token-row").hidden = !tokenRequired();
    showReady(event);
    $("agent-start").title = event.asr === "off" ? "no STT configured (BRIDGE_ASR_URL)" : "";
    updateVoiceButtons();
    pollStatus(); // the reasons, and Moshi "off" when none is configured
    log(`ready: mas ${event.mas}, tts ${event.tts}, asr ${event.asr}, moshi ${event.moshi}`);
  },
  mas_response(event) {
    counters.masResponses += 1;
    const reply = document.createElement("div");
    reply.className = "reply";
    const source = document.createElement("span");
    source.className = "tag";
    source.textContent = event.source;
    reply.append(source, document.createTextNode(` ${event.text}`));
    $("replies").prepend(reply);
    renderList("tool-calls", event.tool_calls);
    renderList("agent-activity", event.agent_activity);
    renderList("memory", event.memory);
    $("extra").textContent = JSON.stringify(event.extra ?? {});
    log(`mas_response (${event.source}): ${event.text.length} characters`);
  },
  transcript(event) {
    counters.transcriptEvents += 1;
    if (event.final) {
      const turn = document.createElement("div");
      turn.className = "turn";
      turn.textContent = event.text;
      $("turns").prepend(turn);
      liveWords = [];
      // The user has finished: the delay runs from the end of their speech (the last loud 80 ms
      // block the page sent) to the first reply audio.
      turnStartedAt = mic?.lastLoudAt ?? performance.now();
    } else {
      liveWords.push(event.text);
    }
    $("live").textContent = liveWords.join(" ") || "…";
  },
  tts_done() {
    log("tts_done: the reply is spoken");
  },
  tts_skipped(event) {
    showError(`reply not spoken (${event.reason}): ${event.message}`);
  },
  tts_interrupted(event) {
    counters.interrupted += 1;
    counters.stoppedSources += player ? player.interrupt() : 0;
    log(`tts_interrupted (${event.reason}): playback stopped`);
    $("playback").textContent = `stopped (${event.reason})`;
  },
  voice_ready(event) {
    counters.voice = event.mode;
    updateVoiceButtons();
    const replies = event.reply_voice ? `, replies by ${event.reply_voice}` : "";
    log(`voice_ready (${event.mode}): ${event.backend}${replies}`);
    mic.beginStream((page) => sendAudio(page));
  },
  reply_voice_fallback(event) {
    log(`reply voice: the TTS speaks (${event.scope}, ${event.reason}): ${event.message}`);
  },
  reply_spoken(event) {
    log(`reply_spoken (${event.reason}): ${event.text}`);
  },
  voice_unavailable(event) {
    showError(`voice unavailable (${event.reason}): ${event.message}`);
    stopVoiceLocally();
  },
  voice_stopped() {
    log("voice_stopped");
    stopVoiceLocally();
  },
  moshi_text(event) {
    $("live").textContent += event.text;
  },
  degraded(event) {
    showError(`${event.component} lost (${event.reason}): ${event.message}; continuing in ${event.mode} mode`);
    stopVoiceLocally();
  },
  error(event) {
    if (event.code === "binary_before_voice" && performance.now() - voiceEndedAt < IN_FLIGHT_MS) {
      // Audio frames that were on the way when voice ended (degraded, voice_stopped): expected.
      log("audio frames in flight at the end of voice were refused (binary_before_voice)");
      return;
    }
    const retry = event.retry_in_s !== undefined ? ` (retry in ${event.retry_in_s} s)` : "";
    showError(`error ${event.code}: ${event.message}${retry}`);
  },
};

function sendAudio(page) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  const frame = new Uint8Array(page.length + 1);
  frame[0] = KIND_AUDIO;
  frame.set(page, 1);
  ws.send(frame);
  counters.framesSent += 1;
}

// --- audio: one AudioContext at 24 kHz for the microphone and the replies ---

/** Makes the context and the player at once (synchronously); resolves once the context runs. */
function ensureAudio() {
  if (!context) {
    context = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
    player = new Player(context, {
      onDecoded: () => {
        counters.audioFramesDecoded += 1;
      },
      onPlayed: (samples) => {
        counters.samplesPlayed += samples;
      },
      onUnderrun: () => {
        counters.underruns += 1;
      },
      onFirstAudio: (startsAt) => {
        $("playback").textContent = "playing";
        if (turnStartedAt !== null) {
          counters.lastDelayMs = Math.round(startsAt - turnStartedAt);
          $("delay").textContent = `${counters.lastDelayMs} ms`;
          $("delay").className = "";
          turnStartedAt = null;
        }
      },
      onError: showError,
    });
  }
  return context.state === "suspended" ? context.resume() : Promise.resolve();
}

async function startVoice(mode) {
  const problem = await Microphone.supported();
  if (problem) {
    showError(`voice cannot start: ${problem}`);
    return;
  }
  await ensureAudio();
  if (!mic) {
    mic = new Microphone(context, {
      onError: showError,
      onBlock: (level) => {
        $("level").value = Math.max(0, 60 + level);
      },
    });
    mic.muted = $("mute").checked;
  }
  try {
    await mic.open();
  } catch (e) {
    showError(`microphone: ${e.message}`);
    return;
  }
  send({ type: "voice_start", mode });
}

function stopVoiceLocally() {
  if (counters.voice !== null || mic?.streaming) voiceEndedAt = performance.now();
  counters.voice = null;
  if (mic) mic.close(); // the stream ends and the microphone is given back
  updateVoiceButtons();
}

function sendTyped(event) {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  ensureAudio().catch((e) => showError(`audio: ${e.message}`));
  if (send({ type: "text", text })) {
    turnStartedAt = performance.now();
    $("text").value = "";
    log(`typed turn sent (${text.length} characters)`);
  }
}

// --- wiring ---

$("connect").addEventListener("click", () => connect());
$("agent-start").addEventListener("click", () => startVoice("agent"));
$("duplex-start").addEventListener("click", () => startVoice("duplex"));
$("voice-stop").addEventListener("click", () => {
  // No audio after voice_stop: the bridge ends voice at once and would refuse it.
  if (mic) mic.endStream();
  voiceEndedAt = performance.now();
  send({ type: "voice_stop" });
});
$("mute").addEventListener("change", (event) => {
  if (mic) mic.muted = event.target.checked;
  else if (event.target.checked) log("muted (the microphone is not open yet)");
});
$("typed").addEventListener("submit", sendTyped);

const savedToken = new URLSearchParams(location.search).get("token") ?? sessionStorage.getItem("bridge-token");
if (savedToken) $("token").value = savedToken;
$("token-row").hidden = !tokenRequired();
updateVoiceButtons();
pollStatus();
statusTimer = setInterval(pollStatus, STATUS_POLL_MS);
window.addEventListener("pagehide", () => clearInterval(statusTimer));
Microphone.supported().then((problem) => {
  if (problem) showError(`voice cannot start: ${problem}`);
});
connect();

// The test (and a curious user) can mute the microphone from the console too.
counters.setMuted = (muted) => {
  $("mute").checked = muted;
  if (mic) mic.muted = muted;
};
