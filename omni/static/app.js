// The chat page of `omni serve`: multi-turn chat over this server's OpenAI-compatible API (/v1/chat/completions,
// streamed as Server-Sent Events), with images, audio and video attached from the browser as base64.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], pending: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    state.model = (await response.json()).data[0].id;
    $("model-name").textContent = "model: " + state.model;
    showError("");
  } catch (e) {
    $("model-name").textContent = "no model (enter the API key?)";
    showError(String(e.message || e));
  }
}

// ----------------------------------------------------------------------------------------------- attachments
function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function extensionOf(name) {
  const dot = name.lastIndexOf(".");
  return dot < 0 ? "" : name.slice(dot + 1).toLowerCase();
}

async function partFor(kind, file) {
  const url = await readDataURL(file);
  const comma = url.indexOf(",");
  if (kind === "image") return { type: "image_url", image_url: { url } };
  if (kind === "audio") {
    const format = { wav: "wav", wave: "wav", flac: "flac", mp3: "mp3" }[extensionOf(file.name)];
    if (!format) throw new Error(`${file.name}: audio must be .wav, .flac or .mp3`);
    return { type: "input_audio", input_audio: { data: url.slice(comma + 1), format } };
  }
  // browsers leave the type empty for some containers (.mkv): name it from the extension
  const header = url.slice(0, comma);
  const fixed = header.startsWith("data:video/") ? url : `data:video/${extensionOf(file.name) || "mp4"};base64,` +
    url.slice(comma + 1);
  return { type: "video_url", video_url: { url: fixed } };
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.pending.forEach((item, index) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = `${item.kind}: ${item.name}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "x";
    remove.title = "remove";
    remove.onclick = () => { state.pending.splice(index, 1); renderAttachments(); };
    chip.appendChild(remove);
    box.appendChild(chip);
  });
}

function watchAttachInput(kind) {
  const input = $("attach-" + kind);
  input.addEventListener("change", async () => {
    for (const file of input.files) {
      try {
        state.pending.push({ kind, name: file.name, part: await partFor(kind, file) });
      } catch (e) {
        showError(String(e.message || e));
      }
    }
    input.value = "";
    renderAttachments();
  });
}

// ----------------------------------------------------------------------------------------------- messages
function addMessage(role, text, parts) {
  const div = document.createElement("div");
  div.className = "message " + role;
  for (const part of parts || []) {
    if (part.type === "image_url") {
      const img = document.createElement("img");
      img.src = part.image_url.url;
      img.alt = "attached image";
      div.appendChild(img);
    } else if (part.type !== "text") {
      const note = document.createElement("div");
      note.className = "media";
      note.textContent = part.type === "input_audio" ? "[audio attached]" : "[video attached]";
      div.appendChild(note);
    }
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").textContent = busy ? "Stop" : "Send";
  $("clear").disabled = busy;
}

// Reads the SSE body: calls onChunk for every `data:` JSON object until `data: [DONE]`.
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() && !state.pending.length) return;
  if (!state.model) await loadModel();
  if (!state.model) return;
  showError("");
  const parts = [...state.pending.map((item) => item.part)];
  if (text) parts.push({ type: "text", text });
  const userMessage = { role: "user", content: parts };
  const userDiv = addMessage("user", text, parts);
  const answerDiv = addMessage("assistant", "", []);
  answerDiv.dataset.state = "streaming";
  answerDiv.dataset.chunks = "0";
  const answerText = answerDiv.querySelector(".text");
  const request = {
    model: state.model, messages: [...state.history, userMessage], stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  state.controller = new AbortController();
  setBusy(true);
  let answer = "", finish = null, usage = null, failed = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) { failed = chunk.error.message; return; }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        answerText.textContent = answer;
        answerDiv.dataset.chunks = String(Number(answerDiv.dataset.chunks) + 1);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (failed) throw new Error(failed);
  } catch (e) {
    failed = e.name === "AbortError" ? "stopped" : String(e.message || e);
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (failed && failed !== "stopped") {
    // the turn did not happen: the history stays as it was and the attachments stay pending
    userDiv.remove();
    answerDiv.remove();
    showError(failed);
    return;
  }
  state.history.push(userMessage, { role: "assistant", content: answer });
  state.pending = [];
  renderAttachments();
  $("prompt").value = "";
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = failed ? "stopped" : `${finish}` + (usage ? ` · ${usage.completion_tokens} tokens` : "");
  answerDiv.appendChild(meta);
  answerDiv.dataset.finish = failed ? "stopped" : finish;
  answerDiv.dataset.state = "done";
}

function clearChat() {
  state.history = [];
  state.pending = [];
  $("messages").replaceChildren();
  renderAttachments();
  showError("");
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.controller) state.controller.abort(); else send();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("clear").addEventListener("click", clearChat);
$("api-key").addEventListener("change", loadModel);
["image", "audio", "video"].forEach(watchAttachInput);
loadModel();
