// The axiscap playground: the same chat sent capped, gated (where the engine gates) and uncapped,
// streamed side by side, each token shaded by its projection on the Assistant Axis, and the whole
// conversation's trajectory drawn from the prompt's per-message figures. It uses only the public
// API, like any client.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = { capped: "#2e6fd8", gated: "#2ca05a", uncapped: "#e07b1f", enforced: "#2e6fd8" };
const ROLE_COLORS = { system: "#7f8c8d", user: "#8e44ad", assistant: "#2c3e50", tool: "#95a5a6" };

const state = {
  info: null,       // /health: model, policy, tau, the default Assistant's spread
  sides: [],        // [{name, capping}] : two under the client policy, one when the operator enforces it
  history: [],      // the shared conversation: user turns and the chosen assistant answers
  turns: [],        // per turn: {side name: mean projection}
  trajectory: null, // the last turn's prompt, message by message: [{role, mean}], then the answers
  pending: null,    // the last turn's answers, until the next send picks one to continue from
  busy: false,
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadInfo() {
  const response = await fetch("/health", { headers: headers() });
  if (!response.ok && response.status !== 503) {
    $("server-info").textContent = `cannot read /health (${await errorMessage(response)}); enter an API key and reload`;
    return;
  }
  const info = await response.json();
  state.info = info;
  const tau = info.monitor_tau;
  $("server-info").textContent = `${info.model} · monitor layer ${info.monitor_layer}` +
    (tau != null ? ` · τ = ${tau.toFixed(2)}` : "") + ` · capped layers ${info.cap_layers.join(", ")}` +
    (info.status !== "ok" ? ` · engine ${info.status}` : "");
  const notices = [];
  if (info.capping_policy === "client") {
    state.sides = [{ name: "capped", capping: true }, { name: "uncapped", capping: false }];
    // Gated: uncapped until the conversation or the answer drifts (steering/gate.py).
    if (info.gated_capping) state.sides.splice(1, 0, { name: "gated", capping: "auto" });
  } else {
    const enforced = { always: true, never: false, gated: "auto" }[info.capping_policy];
    state.sides = [{ name: "enforced", capping: enforced }];
    notices.push(`The operator enforces capping (${info.capping_policy}): clients cannot switch it, ` +
                 "so this page shows the one answer the server gives.");
  }
  if (!info.allow_projections) {
    notices.push("This server does not return axis projections: tokens are not shaded and no charts are drawn.");
  }
  $("notice").hidden = notices.length === 0;
  $("notice").textContent = notices.join(" ");
  drawLegend();
  drawTurnChart();
}

// --- shading -------------------------------------------------------------------------------

function scale() {
  const info = state.info;
  return info.monitor_std || Math.max(1, Math.abs(info.monitor_tau || 1) * 0.1);
}

function shade(projection) {
  const tau = state.info.monitor_tau;
  if (tau == null) return "transparent";
  const t = Math.max(-1, Math.min(1, (projection - tau) / (2 * scale())));
  // Below tau (away from the Assistant) in red, above in blue; stronger the further from tau.
  return t < 0 ? `rgba(214, 48, 49, ${0.15 + 0.6 * -t})` : `rgba(46, 111, 216, ${0.08 + 0.4 * t})`;
}

function drawLegend() {
  const legend = $("legend");
  legend.innerHTML = "";
  for (const side of state.sides) {
    const item = document.createElement("span");
    item.innerHTML = `<span class="swatch" style="background:${COLORS[side.name]}"></span> ${side.name}`;
    legend.append(item);
  }
  if (state.info && state.info.monitor_tau != null) {
    const tau = document.createElement("span");
    tau.innerHTML = `<span class="swatch" style="background:${shade(state.info.monitor_tau - 2 * scale())}"></span>` +
      ` below τ (away from the Assistant) <span class="swatch" style="background:` +
      `${shade(state.info.monitor_tau + 2 * scale())}"></span> above τ · dashed line: τ`;
    legend.append(tau);
  }
}

// --- charts --------------------------------------------------------------------------------

function drawLines(canvas, series, tau, xLabel = null, marks = []) {
  // series: [{color, values, pointColors?}]; x is the index, y the projection; tau is drawn as a
  // dashed line; xLabel(i) names the points along the x axis; marks: [{at, color, label}], vertical
  // lines at those indices (where a gated answer's capping began).
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const all = series.flatMap((s) => s.values).concat(tau != null ? [tau] : []);
  if (all.length === 0) return;
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1e-6) { lo -= 1; hi += 1; }
  const pad = 0.08 * (hi - lo);
  lo -= pad; hi += pad;
  const left = 44, right = 8, top = 8, bottom = 18;
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const x = (i) => left + (i / (n - 1)) * (width - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#666";
  ctx.strokeStyle = "#ccc";
  ctx.beginPath(); ctx.moveTo(left, top); ctx.lineTo(left, height - bottom); ctx.lineTo(width - right, height - bottom);
  ctx.stroke();
  ctx.fillText(hi.toFixed(1), 2, top + 10);
  ctx.fillText(lo.toFixed(1), 2, height - bottom);
  if (xLabel) for (let i = 0; i < n; i++) ctx.fillText(xLabel(i), Math.min(x(i), width - right - 40), height - 4);
  if (tau != null) {
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = "#c0392b";
    ctx.beginPath(); ctx.moveTo(left, y(tau)); ctx.lineTo(width - right, y(tau)); ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#c0392b";
    ctx.fillText("τ", width - right - 10, y(tau) - 3);
  }
  for (const mark of marks) {
    ctx.strokeStyle = mark.color;
    ctx.beginPath(); ctx.moveTo(x(mark.at), top); ctx.lineTo(x(mark.at), height - bottom); ctx.stroke();
    ctx.fillStyle = mark.color;
    ctx.fillText(mark.label, Math.min(x(mark.at) + 3, width - right - 60), top + 10);
  }
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
    if (s.values.length < 40) {
      s.values.forEach((v, i) => {
        ctx.fillStyle = (s.pointColors && s.pointColors[i]) || s.color;
        ctx.fillRect(x(i) - 3, y(v) - 3, 6, 6);
      });
    }
  }
  ctx.lineWidth = 1;
}

function drawTurnChart() {
  const canvas = $("turn-chart");
  const series = state.sides.map((side) => ({
    color: COLORS[side.name],
    values: state.turns.map((t) => t[side.name]).filter((v) => v != null),
  }));
  canvas.dataset.points = String(state.turns.length);
  drawLines(canvas, series, state.info ? state.info.monitor_tau : null,
            (i) => (i < state.turns.length ? `turn ${i + 1}` : ""));
}

function drawTrajectory() {
  // The whole conversation at the monitor layer: each prompt message's own mean (the server's
  // prompt_projections, coloured by role), then this turn's answer on each side.
  const canvas = $("trajectory-chart");
  const messages = (state.trajectory && state.trajectory.messages) || [];
  const measured = messages.filter((m) => m.mean != null);
  const series = state.sides.map((side) => {
    const answer = state.trajectory && state.trajectory.answers[side.name];
    const values = measured.map((m) => m.mean).concat(answer != null ? [answer] : []);
    return { color: COLORS[side.name], values, pointColors: measured.map((m) => ROLE_COLORS[m.role] || "#333") };
  });
  canvas.dataset.messages = String(measured.length);
  const labels = measured.map((m) => m.role).concat(["answer"]);
  drawLines(canvas, series, state.info ? state.info.monitor_tau : null, (i) => labels[i] || "");
  const drift = state.trajectory && state.trajectory.drift;
  $("trajectory-stats").textContent = drift && drift.assistant_turns ?
    `${drift.assistant_turns} assistant turn${drift.assistant_turns === 1 ? "" : "s"} · EWMA ${drift.ewma.toFixed(2)} · CUSUM below τ ${drift.cusum.toFixed(2)}` : "";
}

// --- one streamed answer -------------------------------------------------------------------

function requestBody(messages, side, settings) {
  const body = {
    model: state.info.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: settings.temperature, max_tokens: settings.maxTokens, seed: settings.seed,
    capping: side.capping, logprobs: true,
  };
  if (state.info.allow_projections) body.return_projections = true;
  return body;
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

async function streamAnswer(cell, messages, side, settings) {
  const answer = cell.querySelector(".answer");
  const stats = cell.querySelector(".stats");
  const projections = [];
  let prompt = null;      // the prompt's per-message figures (first chunk)
  let cappedFrom = null;  // a gated answer: its first capped token
  const finish = (stateName, message) => {
    cell.dataset.state = stateName;
    if (message) {
      const error = document.createElement("p");
      error.className = "error";
      error.textContent = message;
      cell.append(error);
    }
  };
  const body = requestBody(messages, side, settings);
  $("last-request").textContent = `POST /v1/chat/completions\n${JSON.stringify(body, null, 2)}`;
  let response;
  try {
    response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (err) {
    finish("error", `could not reach the server: ${err}`);
    return null;
  }
  if (!response.ok) {
    finish("error", await errorMessage(response));
    return null;
  }
  let text = "";
  for await (const data of sseEvents(response)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) { finish("error", `the stream failed: ${chunk.error.message}`); return null; }
    if (chunk.usage) {
      cell.dataset.tokens = String(chunk.usage.completion_tokens);
      stats.textContent = `${chunk.usage.completion_tokens} tokens` + (projections.length ?
        ` · mean projection ${mean(projections).toFixed(2)}` : "") +
        (chunk.capping_overridden ? " · capping overridden by the server" : "");
    }
    if (chunk.prompt_projections) prompt = chunk.prompt_projections;
    for (const choice of chunk.choices) {
      const entries = (choice.logprobs && choice.logprobs.content) || [];
      const values = choice.axis_projections || [];
      const first = answer.querySelectorAll(".tok").length;  // index of this chunk's first token
      if (choice.capping_from != null) {
        cappedFrom = choice.capping_from;
        cell.dataset.cappingFrom = String(cappedFrom);
      }
      entries.forEach((entry, i) => {
        const span = document.createElement("span");
        const isEnd = choice.finish_reason === "stop" && i === entries.length - 1 &&
          !(choice.delta.content || "").endsWith(entry.token);
        span.className = "tok" + (isEnd ? " eos" : "");
        span.textContent = isEnd ? "⏎" : entry.token;
        if (cappedFrom != null && first + i === cappedFrom) {
          span.classList.add("cap-start");
          span.title = "capping on from here";
        }
        if (values[i] != null) {
          span.style.background = shade(values[i]);
          span.title = (span.title ? span.title + " · " : "") + `projection ${values[i].toFixed(2)}`;
          if (state.info.monitor_tau != null && values[i] < state.info.monitor_tau) span.classList.add("below");
          projections.push(values[i]);
        }
        answer.append(span);
      });
      text += choice.delta.content || "";
      if (choice.finish_reason) cell.dataset.finish = choice.finish_reason;
    }
    const marks = cappedFrom != null ? [{ at: cappedFrom, color: COLORS.gated, label: "capping on" }] : [];
    drawLines(cell.querySelector("canvas"), [{ color: COLORS[side.name], values: projections }],
              state.info.monitor_tau, null, marks);
  }
  if (side.capping === "auto") {
    stats.textContent += cappedFrom == null ? " · the gate never capped" :
      cappedFrom === 0 ? " · capped from the first token (the prompt had drifted)" : ` · capped from token ${cappedFrom}`;
  }
  finish("done");
  return { text, mean: projections.length ? mean(projections) : null, prompt };
}

const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;

// --- turns ---------------------------------------------------------------------------------

function newTurn(userText) {
  const turn = document.createElement("div");
  turn.className = "turn";
  turn.innerHTML = `<div class="user"></div><div class="sides" style="--sides:${state.sides.length}"></div>`;
  turn.querySelector(".user").textContent = userText;
  const cells = state.sides.map((side) => {
    const cell = document.createElement("div");
    cell.className = "side";
    cell.dataset.side = side.name;
    cell.dataset.state = "streaming";
    cell.innerHTML = `<h3 style="color:${COLORS[side.name]}">${side.name}</h3><div class="answer"></div>` +
      `<canvas class="token-chart" width="520" height="140"></canvas><div class="stats"></div>`;
    turn.querySelector(".sides").append(cell);
    return cell;
  });
  $("conversation").append(turn);
  return cells;
}

function offerContinuation(cells, answers) {
  state.pending = { answers, chosen: state.sides.findIndex((_, i) => answers[i] !== null) };
  cells.forEach((cell, i) => {
    if (answers[i] === null) return;
    if (i === state.pending.chosen) cell.classList.add("chosen");
    if (cells.length < 2) return;
    const button = document.createElement("button");
    button.className = "continue";
    button.type = "button";
    button.textContent = "continue from this answer";
    button.addEventListener("click", () => {
      state.pending.chosen = i;
      cells.forEach((c) => c.classList.toggle("chosen", c === cell));
    });
    cell.append(button);
  });
}

function settings() {
  const seed = $("seed").value.trim();
  return {
    // One seed for both sides, so they differ only by capping.
    seed: seed === "" ? Math.floor(Math.random() * 2 ** 31) : Number(seed),
    temperature: Number($("temperature").value),
    maxTokens: Number($("max-tokens").value),
  };
}

async function send(event) {
  event.preventDefault();
  if (state.busy || !state.info) return;
  const userText = $("message").value.trim();
  if (!userText) return;
  if (state.pending && state.pending.chosen >= 0) {
    state.history.push({ role: "assistant", content: state.pending.answers[state.pending.chosen].text });
  }
  document.querySelectorAll(".continue").forEach((b) => b.remove());
  state.pending = null;
  state.history.push({ role: "user", content: userText });
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  state.busy = true;
  $("send").disabled = true;
  $("message").value = "";
  const cells = newTurn(userText);
  const run = settings();
  const answers = await Promise.all(state.sides.map((side, i) => streamAnswer(cells[i], messages, side, run)));
  const turn = {};
  state.sides.forEach((side, i) => { if (answers[i] && answers[i].mean != null) turn[side.name] = answers[i].mean; });
  const prompt = answers.find((a) => a && a.prompt);  // every side sent the same messages
  if (prompt) state.trajectory = { ...prompt.prompt, answers: turn };
  drawTrajectory();
  if (answers.some((a) => a !== null)) {
    state.turns.push(turn);
    offerContinuation(cells, answers);
  } else {
    state.history.pop();  // nothing answered: the turn can be sent again
    $("message").value = userText;
  }
  drawTurnChart();
  state.busy = false;
  $("send").disabled = false;
}

$("composer").addEventListener("submit", send);
$("api-key").addEventListener("change", loadInfo);
loadInfo();
