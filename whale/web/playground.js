// whale's playground: the chat (streamed from /v1/chat/completions) and the dashboard (read from /metrics).
// Plain JavaScript, no build step, no request to any other host. Conversations stay in this browser
// (localStorage); the API key for the tab's session only (sessionStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "whale.playground";
const store = JSON.parse(localStorage.getItem(STORE) || "null") || { conversations: [], current: null };
let controller = null;  // the AbortController of the request in flight

// -- conversations ----------------------------------------------------------------------------------------
function save() { localStorage.setItem(STORE, JSON.stringify(store)); }
function conversation() {
  let found = store.conversations.find((c) => c.id === store.current);
  if (!found) {
    found = { id: String(Date.now()), title: "New conversation", messages: [] };
    store.conversations.unshift(found);
    store.current = found.id;
  }
  return found;
}
function listConversations() {
  const select = $("conversation");
  select.replaceChildren(...store.conversations.map((c) => new Option(c.title, c.id, false, c.id === store.current)));
}

// -- the API ----------------------------------------------------------------------------------------------
function headers() {
  const out = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}
async function apiError(response) {
  // the API's own words: DeepSeek's {"error": {"message": ...}} shape
  try {
    const body = await response.json();
    return `${response.status}: ${body.error?.message || JSON.stringify(body)}`;
  } catch {
    return `${response.status}: ${response.statusText}`;
  }
}
async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { showError(await apiError(response)); return; }
  const chosen = $("model").value;
  const ids = (await response.json()).data.map((m) => m.id);
  $("model").replaceChildren(...ids.map((id) => new Option(id, id, false, id === chosen)));
}

function requestBody(messages) {
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true } };
  const system = $("system").value.trim();
  if (system) body.messages = [{ role: "system", content: system }, ...messages];
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const mode = $("mode").value, budget = parseInt($("budget").value, 10);
  if (mode || budget > 0) {
    body.thinking = { type: mode || "enabled" };
    if (budget > 0) body.thinking.budget_tokens = budget;
  }
  if ($("effort").value) body.reasoning_effort = $("effort").value;
  const format = $("format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") {
    body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: parseJSON("schema", "JSON schema") } };
  }
  const tools = $("tools").value.trim();
  if (tools) body.tools = parseJSON("tools", "Tools");
  return body;
}
function parseJSON(id, name) {
  try {
    return JSON.parse($(id).value);
  } catch (error) {
    throw new Error(`${name} is not valid JSON: ${error.message}`);
  }
}

// the history as the API takes it: reasoning passed back (V4 needs it after tool calls), tool calls kept
function apiMessages(messages) {
  return messages.filter((m) => !m.error).map((m) => {
    const out = { role: m.role, content: m.content || "" };
    if (m.reasoning) out.reasoning_content = m.reasoning;
    if (m.tool_calls?.length) out.tool_calls = m.tool_calls;
    return out;
  });
}

async function generate() {
  const talk = conversation();
  showError("");
  let body;
  try {
    body = requestBody(apiMessages(talk.messages));
  } catch (error) {
    showError(error.message);
    return;
  }
  const reply = { role: "assistant", content: "", reasoning: "", tool_calls: [], streaming: true };
  talk.messages.push(reply);
  render();
  controller = new AbortController();
  busy(true);
  let end = "stop";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await apiError(response));
    reply.route = ["mode", "budget", "score"].map((k) => response.headers.get(`x-whale-route-${k}`));
    await readStream(response, (chunk) => {
      if (chunk.usage) reply.usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) return;
      const delta = choice.delta || {};
      if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
      if (delta.content) reply.content += delta.content;
      for (const call of delta.tool_calls || []) {
        const slot = reply.tool_calls[call.index] ||= { id: "", type: "function", function: { name: "", arguments: "" } };
        if (call.id) slot.id = call.id;
        if (call.function?.name) slot.function.name += call.function.name;
        if (call.function?.arguments) slot.function.arguments += call.function.arguments;
      }
      if (choice.finish_reason) end = choice.finish_reason;
      render();
    });
  } catch (error) {
    if (error.name === "AbortError") {
      end = "stopped";
    } else {
      end = "error";
      showError(error.message);
      if (!reply.content && !reply.reasoning) talk.messages.pop();
    }
  } finally {
    reply.streaming = false;
    reply.end = end;
    controller = null;
    busy(false);
    if (talk.title === "New conversation") {
      const asked = talk.messages.find((m) => m.role === "user");
      if (asked) talk.title = asked.content.slice(0, 40);
    }
    save();
    render();
    listConversations();
  }
}

// Server-sent events: "data: {json}" lines, ": keep-alive" comments, "data: [DONE]" at the end
async function readStream(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, cut).trim();
      buffered = buffered.slice(cut + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onChunk(chunk);
    }
  }
}

// -- rendering --------------------------------------------------------------------------------------------
function element(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
function render() {
  const talk = conversation();
  $("messages").replaceChildren(...talk.messages.map((m, index) => renderMessage(m, index)));
  $("messages").lastElementChild?.scrollIntoView({ block: "end" });
}
function renderMessage(m, index) {
  const item = element("li", { className: m.role });
  item.append(element("div", { className: "role" }, m.role === "user" ? "You" : "Assistant"));
  if (m.role === "user") {
    item.append(element("div", { className: "content" }, m.content));
    const edit = element("button", { type: "button", className: "quiet", textContent: "Edit and resend" });
    edit.setAttribute("aria-label", `Edit message ${index + 1} and resend`);
    edit.addEventListener("click", () => editFrom(index));
    item.append(edit);
    return item;
  }
  if (m.reasoning) {
    const tokens = m.usage?.completion_tokens_details?.reasoning_tokens;
    const budget = m.route?.[1] || (parseInt($("budget").value, 10) || null);
    const words = [m.streaming && !m.content ? "Thinking…" : "Thinking"];
    if (tokens !== undefined) words.push(`${tokens} tokens`);
    if (budget) words.push(`budget ${budget}`);
    const panel = element("details", { className: "thinking", open: m.open ?? false },
                          element("summary", { textContent: words.join(" · ") }),
                          element("div", { className: "thinking-text", textContent: m.reasoning }));
    panel.addEventListener("toggle", () => { m.open = panel.open; });
    item.append(panel);
  }
  item.append(element("div", { className: "content" }, m.content));
  for (const call of m.tool_calls || []) {
    let args = call.function.arguments;
    try { args = JSON.stringify(JSON.parse(args), null, 2); } catch { /* still streaming: as it came */ }
    item.append(element("div", { className: "tool-call" },
                        element("strong", { textContent: `Tool call: ${call.function.name}` }),
                        element("pre", { textContent: args })));
  }
  const meta = [];
  if (m.route?.[0]) meta.push(`route: ${m.route[0]}, score ${m.route[2]}`);
  if (m.usage) meta.push(`${m.usage.prompt_tokens} prompt tokens (${m.usage.prompt_cache_hit_tokens ?? 0} cached), ${m.usage.completion_tokens} generated`);
  if (m.end && m.end !== "stop") meta.push(`ended: ${m.end}`);
  if (meta.length) item.append(element("div", { className: "meta", textContent: meta.join(" · ") }));
  return item;
}
function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}
function busy(on) {
  $("send").disabled = on;
  $("regenerate").disabled = on;
  $("stop").disabled = !on;
}

// -- actions ----------------------------------------------------------------------------------------------
function send(text) {
  if (!text.trim() || controller) return;
  const talk = conversation();
  talk.messages.push({ role: "user", content: text });
  try {
    requestBody(apiMessages(talk.messages));  // settings the page can check itself: the message stays unsent
  } catch (error) {
    talk.messages.pop();
    showError(error.message);
    return;
  }
  $("prompt").value = "";
  generate();
}
function editFrom(index) {
  const talk = conversation();
  $("prompt").value = talk.messages[index].content;
  talk.messages.splice(index);
  save();
  render();
  $("prompt").focus();
}
function regenerate() {
  const talk = conversation();
  while (talk.messages.length && talk.messages.at(-1).role === "assistant") talk.messages.pop();
  if (talk.messages.length) generate();
}

// -- dashboard --------------------------------------------------------------------------------------------
const history = [];  // {t, rate, running}
let previous = null;
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$/);
    if (!match) continue;
    out[match[1]] = (out[match[1]] || 0) + Number(match[3]);  // labelled series summed
  }
  return out;
}
async function poll() {
  if ($("view-dashboard").hidden) return;
  const response = await fetch("/metrics", { headers: headers() });
  if (!response.ok) { showError(await apiError(response)); return; }
  const m = parseMetrics(await response.text());
  const now = performance.now() / 1000;
  const generated = m.whale_generation_tokens_total || 0;
  const rate = previous ? Math.max(0, (generated - previous.generated) / (now - previous.t)) : 0;
  previous = { t: now, generated };
  const prompt = m.whale_prompt_tokens_total || 0;
  $("m-running").textContent = m.whale_engine_running_requests ?? "-";
  $("m-waiting").textContent = m.whale_engine_queue_depth ?? "-";
  $("m-rate").textContent = rate.toFixed(1);
  $("m-kv").textContent = `${((m.whale_kv_cache_usage_ratio || 0) * 100).toFixed(1)}%`;
  $("m-hits").textContent = prompt ? `${((m.whale_prompt_cache_hit_tokens_total || 0) / prompt * 100).toFixed(1)}%` : "-";
  $("m-generated").textContent = String(generated);
  $("m-requests").textContent = String(m.whale_requests_total || 0);
  history.push({ t: now, rate, running: m.whale_engine_running_requests || 0 });
  while (history.length && now - history[0].t > 300) history.shift();
  plot();
  renderRecent();
}
function plot() {
  const canvas = $("plot"), g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (history.length < 2) return;
  const top = Math.max(1, ...history.map((h) => h.rate)), most = Math.max(1, ...history.map((h) => h.running));
  const x = (h) => canvas.width * (1 - (history.at(-1).t - h.t) / 300);
  for (const [key, scale, dash] of [["rate", top, []], ["running", most, [6, 4]]]) {
    g.beginPath();
    g.setLineDash(dash);
    g.strokeStyle = "#0b5cad";
    history.forEach((h, i) => {
      const y = canvas.height - 10 - (canvas.height - 20) * h[key] / scale;
      i ? g.lineTo(x(h), y) : g.moveTo(x(h), y);
    });
    g.stroke();
  }
  g.setLineDash([]);
  g.fillStyle = "#14202b";
  g.fillText(`${top.toFixed(1)} tok/s`, 4, 12);
}
async function renderRecent() {
  const response = await fetch("/metrics/recent", { headers: headers() });
  if (!response.ok) return;
  const rows = (await response.json()).data.map((r) => [
    new Date(r.finished_at * 1000).toLocaleTimeString(), r.route, `${r.prompt_tokens} (${r.cached_tokens})`,
    r.generated_tokens, r.first_token_ms, r.total_ms, r.tokens_per_s ?? "-", r.finish_reason]);
  $("recent").replaceChildren(...rows.map((row) => element("tr", {},
    ...row.map((v) => element("td", { textContent: String(v) })))));
}

// -- planner ----------------------------------------------------------------------------------------------
const PARTS = [["weights_bytes", "weights", "#0b5cad"], ["kv_pool_bytes", "KV cache", "#2a9d8f"],
               ["activation_bytes", "activations", "#e9c46a"], ["cuda_graph_bytes", "CUDA graphs", "#f4a261"],
               ["reserved_bytes", "reserved (runtime headroom)", "#8a99a6"]];
let planned = false;
async function loadCatalog() {
  const response = await fetch("/playground/catalog");
  if (!response.ok) { showError(await apiError(response)); return; }
  const catalog = await response.json();
  $("plan-model").replaceChildren(...catalog.models.map((m) => new Option(m.display_name, m.name)));
  $("plan-gpu").replaceChildren(...catalog.gpus.map((g) => new Option(g, g)));
  $("plan-dtype").append(...catalog.dtypes.map((d) => new Option(d, d)));
  planned = true;
}
async function makePlan() {
  const query = new URLSearchParams({ model: $("plan-model").value, gpu: $("plan-gpu").value,
                                      concurrency: $("plan-concurrency").value || "1" });
  if ($("plan-context").value.trim()) query.set("context", $("plan-context").value.trim());
  if ($("plan-dtype").value) query.set("dtype", $("plan-dtype").value);
  showError("");
  const response = await fetch(`/playground/plan?${query}`);
  if (!response.ok) { showError(await apiError(response)); return; }
  const plan = await response.json();
  const gib = (bytes) => (bytes / 2 ** 30).toFixed(1);
  $("plan-summary").textContent = `${plan.model} on ${plan.gpu}: ${plan.fits ? "fits" : "does not fit"} on ` +
    `${plan.gpus_needed} GPU${plan.gpus_needed === 1 ? "" : "s"} (${plan.layout.description}); ` +
    `${gib(plan.weights_bytes)} GiB of ${plan.dtype} weights, ${plan.kv_cache_bytes_per_token} KV bytes a token, ` +
    `${plan.max_concurrency_at_context} sequences of ${plan.context} tokens at once, ` +
    `~${Math.round(plan.decode_tokens_per_s.single_stream)} tok/s for one stream.`;
  const gpu = plan.per_gpu, total = gpu.capacity_bytes;
  $("plan-bar").replaceChildren(...PARTS.map(([key, name, color]) => {
    const part = element("span", { title: `${name}: ${gib(gpu[key])} GiB` });
    part.style.width = `${100 * gpu[key] / total}%`;
    part.style.background = color;
    return part;
  }));
  $("plan-bar").setAttribute("aria-label", `Memory of one ${plan.gpu}: ` +
    PARTS.map(([key, name]) => `${name} ${gib(gpu[key])} GiB`).join(", ") + ` of ${gib(total)} GiB`);
  $("plan-memory").replaceChildren(...[...PARTS.map(([key, name, color]) => [name, gpu[key], color]), ["capacity", total]]
    .map(([name, bytes, color]) => {
      const swatch = element("span", { className: "swatch" });
      if (color) swatch.style.background = color;
      return element("tr", {}, element("td", {}, swatch, name), element("td", { textContent: gib(bytes) }));
    }));
  $("plan-launch").replaceChildren(...Object.entries(plan.launch).map(([engine, command]) =>
    element("div", {}, element("h3", { textContent: engine }), element("pre", { className: "launch", textContent: command }))));
  $("plan-notes").replaceChildren(...plan.notes.map((note) => element("li", { textContent: note })));
  $("plan-result").hidden = false;
}

// -- wiring -----------------------------------------------------------------------------------------------
function show(view) {
  for (const name of ["chat", "dashboard", "planner"]) {
    $(`view-${name}`).hidden = name !== view;
    $(`tab-${name}`).setAttribute("aria-selected", String(name === view));
  }
  if (view === "dashboard") poll();
  if (view === "planner" && !planned) loadCatalog();
}
$("tab-chat").addEventListener("click", () => show("chat"));
$("tab-dashboard").addEventListener("click", () => show("dashboard"));
$("tab-planner").addEventListener("click", () => show("planner"));
$("plan-form").addEventListener("submit", (event) => { event.preventDefault(); makePlan(); });
$("composer").addEventListener("submit", (event) => { event.preventDefault(); send($("prompt").value); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send($("prompt").value); }
});
$("stop").addEventListener("click", () => controller?.abort());
$("regenerate").addEventListener("click", regenerate);
$("new-conversation").addEventListener("click", () => {
  store.current = null;
  conversation();
  save(); listConversations(); render();
});
$("conversation").addEventListener("change", (event) => { store.current = event.target.value; save(); render(); });
$("api-key").value = sessionStorage.getItem(STORE + ".key") || "";
$("api-key").addEventListener("change", () => { sessionStorage.setItem(STORE + ".key", $("api-key").value); loadModels(); });
setInterval(poll, 2000);
conversation();
listConversations();
render();
loadModels();
