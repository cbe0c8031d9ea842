#!/usr/bin/env node
// Conformance oracle for splitmoe's C++ Jinja renderer (common/chat/jinja.h); see
// tests/chat/chat_template_conformance_test.cc.
//
// Reads JSON lines on stdin, each {"template": "...", "context": {...}}, and prints one JSON line
// per input line: {"ok": true, "text": "..."} or {"ok": false, "error": "..."}. The template is
// rendered by @huggingface/jinja (the Jinja implementation of transformers.js, pinned in
// package.json), which, like HF transformers, tokenizes with trim_blocks and lstrip_blocks on.
// The context's members become the template's variables.
//
//   echo '{"template": "{{ x + 1 }}", "context": {"x": 1}}' | node tools/chat-oracle/render.mjs
import { createInterface } from "node:readline";
import { Template } from "@huggingface/jinja";

// Error messages may quote half of a surrogate pair ("Unexpected character: \ud83d"): keep the
// output valid UTF-8 JSON (String.prototype.toWellFormed is Node >= 20).
function wellFormed(s) {
  if (typeof s.toWellFormed === "function") return s.toWellFormed();
  return s.replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, "\ufffd");
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
const out = [];
for await (const line of lines) {
  if (line.trim() === "") continue;
  let result;
  try {
    const { template, context } = JSON.parse(line);
    if (typeof template !== "string") throw new Error("render.mjs: 'template' must be a string");
    result = { ok: true, text: new Template(template).render(context ?? {}) };
  } catch (e) {
    result = { ok: false, error: wellFormed(String(e?.message ?? e)) };
  }
  out.push(JSON.stringify(result));
  if (out.length >= 256) {
    process.stdout.write(out.join("\n") + "\n");
    out.length = 0;
  }
}
if (out.length > 0) process.stdout.write(out.join("\n") + "\n");
