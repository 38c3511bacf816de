// The web chat page. Plain JavaScript, no build step.
//
// Everything Marvin (the model) says is untrusted text: it is only ever put on the page with
// textContent, never as HTML.
//
// A reply shows as it is written: "chunk" events grow a partial bubble (keyed by the message it
// answers), a new stream id for the same message starts it over (the worker crashed mid-reply and
// the message was redelivered), and the "reply" event, the record of truth, replaces it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    conversation: $("conversation"),
    messages: $("messages"),
    thinking: $("thinking"),
    status: $("status"),
    form: $("composer"),
    text: $("text"),
    send: $("send"),
  };
  const shown = new Map(); // turn key ("role:timestamp") -> <li>, so no turn shows twice
  const pending = new Set(); // ids of our messages that wait for a reply
  const answered = new Set(); // ids that replies named (a reply may beat the POST's answer)
  const streaming = new Map(); // id of the message answered -> {streamId, item, text}
  const UNANSWERED = { error: "the model failed", timeout: "the model timed out" };
  let conversationId = null;
  let justCreated = false;

  const api = (path) => `/api/conversations/${encodeURIComponent(conversationId)}${path}`;

  function conversationFromLocation() {
    const match = location.pathname.match(/^\/c\/([^/]+)$/);
    if (match) return decodeURIComponent(match[1]);
    return new URLSearchParams(location.search).get("c");
  }

  function showStatus(message) {
    els.status.textContent = message || "";
    els.status.hidden = !message;
  }

  function setReady(ready) {
    els.text.disabled = !ready;
    els.send.disabled = !ready;
    document.body.dataset.ready = String(ready);
  }

  function updateThinking() {
    // "Thinking" until the first words of every awaited reply show.
    els.thinking.hidden = [...pending].every((id) => streaming.has(id));
  }

  function settle(messageId) {
    if (!messageId) return;
    answered.add(messageId);
    pending.delete(messageId);
    const partial = streaming.get(messageId);
    if (partial) partial.item.remove();
    streaming.delete(messageId);
    updateThinking();
  }

  function bubble(role, value) {
    const item = document.createElement("li");
    item.className = role === "ai" ? "turn ai" : "turn human";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "ai" ? "Marvin" : "You";
    const text = document.createElement("p");
    text.className = "text";
    text.textContent = value;
    item.append(who, text);
    return item;
  }

  // Insert a turn in time order (timestamps are nanosecond strings: compare as BigInt).
  function place(item, timestamp) {
    item.dataset.timestamp = timestamp;
    const at = BigInt(timestamp);
    const next = [...els.messages.children].find((other) => BigInt(other.dataset.timestamp) > at);
    els.messages.insertBefore(item, next || null);
    item.scrollIntoView({ block: "end" });
  }

  function render(turn) {
    if (shown.has(turn.key)) return;
    const item = bubble(turn.role, turn.text);
    item.dataset.key = turn.key;
    place(item, turn.timestamp);
    shown.set(turn.key, item);
  }

  // One piece of a reply being written.
  function grow(chunk) {
    const id = chunk.in_reply_to;
    if (!id || answered.has(id)) return; // the final reply is here: it wins
    let partial = streaming.get(id);
    if (!partial || partial.streamId !== chunk.stream_id) {
      const restarted = Boolean(partial);
      if (partial) partial.item.remove();
      const item = bubble("ai", "");
      item.classList.add("partial");
      if (restarted) item.dataset.restarted = "true";
      partial = { streamId: chunk.stream_id, item, text: "" };
      streaming.set(id, partial);
      place(item, String(BigInt(Date.now()) * 1000000n));
    }
    partial.text += chunk.delta;
    // The final reply is stripped: so is what shows before it.
    partial.item.querySelector(".text").textContent = partial.text.trimStart();
    if (chunk.done && UNANSWERED[chunk.finish_reason]) {
      partial.item.classList.replace("partial", "failed");
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = `Marvin could not answer: ${UNANSWERED[chunk.finish_reason]}.`;
      partial.item.append(note);
      pending.delete(id);
      answered.add(id);
      streaming.delete(id);
    }
    updateThinking();
  }

  async function loadHistory() {
    const response = await fetch(api("/history"));
    const body = await response.json().catch(() => ({}));
    if (response.status === 404) {
      // A conversation opened a moment ago is not stored until the worker sees its greeting.
      if (!justCreated) showStatus("Nothing stored for this conversation yet.");
      return;
    }
    if (!response.ok) {
      showStatus(body.error || `history: HTTP ${response.status}`);
      return;
    }
    showStatus("");
    for (const turn of body.turns) {
      render(turn);
      // The worker stores a message together with its reply: a stored message is answered.
      if (turn.role === "human") settle(turn.message_id);
    }
  }

  function listen() {
    const events = new EventSource(api("/events"));
    // "ready" comes once the server is subscribed, also after every reconnection: load the
    // history then, so nothing sent while the stream was down goes missing.
    events.addEventListener("ready", async () => {
      showStatus("");
      await loadHistory();
      setReady(true);
      els.text.focus();
    });
    events.addEventListener("reply", (event) => {
      const turn = JSON.parse(event.data);
      settle(turn.in_reply_to);
      render(turn);
    });
    events.addEventListener("chunk", (event) => grow(JSON.parse(event.data)));
    events.addEventListener("error", () => {
      setReady(false);
      showStatus("Connection to the chat server lost; reconnecting\u2026");
    });
  }

  async function openConversation() {
    const response = await fetch("/api/conversations", { method: "POST" });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    justCreated = true;
    conversationId = body.conversation_id;
    history.replaceState(null, "", `/c/${encodeURIComponent(conversationId)}`);
    render(body.greeting);
  }

  async function send(text) {
    const response = await fetch(api("/messages"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      showStatus(body.error || `send: HTTP ${response.status}`);
      return false;
    }
    showStatus("");
    render(body.turn);
    if (!answered.has(body.message_id)) pending.add(body.message_id);
    updateThinking();
    return true;
  }

  els.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = els.text.value;
    if (!text.trim()) return;
    els.send.disabled = true;
    try {
      if (await send(text)) els.text.value = "";
    } catch (error) {
      showStatus(`send: ${error.message}`);
    } finally {
      els.send.disabled = els.text.disabled;
      els.text.focus();
    }
  });

  els.text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.form.requestSubmit();
    }
  });

  async function start() {
    setReady(false);
    try {
      conversationId = conversationFromLocation();
      if (!conversationId) await openConversation();
      els.conversation.textContent = `conversation ${conversationId}`;
      listen();
    } catch (error) {
      showStatus(`Cannot open a conversation: ${error.message}`);
    }
  }

  start();
})();
